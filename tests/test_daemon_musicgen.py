"""The daemon with the MusicGen backend: get_backends' real state and limits, set_backend,
LOFI_BACKEND, a MusicGen job with progress and cancel, and the parameters each backend refuses."""

from __future__ import annotations

import pytest
import soundfile as sf

from tests.daemon_util import Daemon, make_home, staging_files
from tests.test_musicgen import CKPT


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = make_home(tmp_path_factory.mktemp("mg"))
    (h / "musicgen").symlink_to(CKPT.resolve(), target_is_directory=True)
    return h


@pytest.fixture(scope="module")
def daemon(home):
    with Daemon(home) as d:
        yield d


def test_get_backends_and_set_backend(daemon, home):
    by = {x["name"]: x for x in daemon.call("get_backends")["backends"]}
    mg = by["musicgen"]
    assert (mg["state"], mg["min_duration_sec"], mg["max_duration_sec"], mg["sample_rate"]) == \
        ("ready", 5.0, 120.0, 48000)
    assert mg["engine"] == "mlx" and mg["model_version"].startswith("musicgen-h48-l3-k4")
    assert mg["engines"]["mlx"] == "available" and mg["license"] == "CC-BY-NC-4.0"
    assert mg["path"] == str(home / "musicgen") and mg["current"] is False
    r = daemon.call("set_backend", {"backend": "musicgen"})
    assert (r["backend"], r["previous"], r["state"]) == ("musicgen", "ace-step", "ready")
    assert daemon.call("status")["backend"] == "musicgen"
    daemon.call("set_backend", {"backend": "ace-step"})


def test_musicgen_job_with_progress_then_cancel(daemon, home):
    res = daemon.call("generate", {"prompt": "lofi hip hop", "duration_sec": 5, "seed": 2,
                                   "backend": "musicgen", "top_k": 50, "guidance_scale": 3})
    kind, done = daemon.end(res["track_id"], timeout=120)
    assert kind == "complete", done
    assert (done["backend"], done["sample_rate"], done["channels"]) == ("musicgen", 48000, 2)
    info = sf.info(done["path"])
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 240000)
    prog = daemon.events("generation_progress", res["track_id"])
    steps = [p["step"] for p in prog if p["stage"] == "sampling"]
    assert steps and max(steps) <= 253 and prog[-1]["total_steps"] == 253  # 250 frames + 3
    # same request, same seed: the cached track
    again = daemon.call("generate", {"prompt": "lofi hip hop", "duration_sec": 5, "seed": 2,
                                     "backend": "musicgen", "top_k": 50, "guidance_scale": 3})
    assert again["status"] == "cached" and again["track_id"] == res["track_id"]
    long = daemon.call("generate", {"prompt": "rock", "duration_sec": 60, "seed": 3,
                                    "backend": "musicgen"})
    daemon.wait_for(lambda m: m.get("method") == "generation_progress"
                    and m["params"]["track_id"] == long["track_id"] and m["params"]["step"] >= 2,
                    timeout=120)
    assert daemon.call("cancel", {"track_id": long["track_id"]})["was_running"] is True
    c = daemon.event("generation_cancelled", long["track_id"], timeout=10)
    assert 2 <= c["at_step"] < c["total_steps"]
    assert staging_files(home) == []


def test_each_backend_refuses_the_others_parameters(daemon):
    r = daemon.request("generate", {"prompt": "x", "duration_sec": 10, "backend": "musicgen",
                                    "infer_steps": 3, "scheduler": "heun"})
    e = r["error"]
    assert e["data"]["code"] == "INVALID_PARAMS" and "infer_steps" in e["message"]
    assert "scheduler" in e["message"] and e["data"]["fields"] == ["infer_steps", "scheduler"]
    r = daemon.request("generate", {"prompt": "x", "duration_sec": 10, "top_k": 5})
    assert r["error"]["data"]["code"] == "INVALID_PARAMS" and "top_k" in r["error"]["message"]
    r = daemon.request("generate", {"prompt": "x", "duration_sec": 121, "backend": "musicgen"})
    assert r["error"]["data"]["code"] == "INVALID_DURATION" and "120" in r["error"]["message"]
    assert daemon.call("ping") is not None  # still serving


def test_lofi_backend_musicgen(tmp_path):
    home = make_home(tmp_path)
    with Daemon(home, env={"LOFI_BACKEND": "musicgen"}) as d:
        mg = {x["name"]: x for x in d.call("get_backends")["backends"]}["musicgen"]
        assert mg["current"] and mg["state"] == "not_installed" and "lofi setup musicgen" in mg["message"]
        (home / "musicgen").symlink_to(CKPT.resolve(), target_is_directory=True)
        res = d.call("generate", {"prompt": "lofi", "duration_sec": 5, "seed": 1})
        kind, done = d.end(res["track_id"], timeout=120)
        assert kind == "complete" and done["backend"] == "musicgen"

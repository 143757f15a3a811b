"""The real `lofi-daemon` process with the real MLX engine on the tiny checkpoint from the fixtures:
generate -> progress -> a 48 kHz stereo WAV of the requested length, a cached repeat, ping while
generating, cancel of a running job, stdin closed mid-generation, and a missing or damaged
checkpoint reported with the right code while the daemon stays up."""

import shutil
import time

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file, save_file

from tests.daemon_util import CHECKPOINT, Daemon, make_home, staging_files, track_files

pytest.importorskip("mlx.core")

REQ = {"prompt": "lofi hip hop, jazzy piano, vinyl crackle", "duration_sec": 5, "infer_steps": 2}
# long enough on the fast tiny model for many pings and several progress events (<= 4 a second)
REQ_LONG = dict(REQ, infer_steps=12)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def daemon(home):
    d = Daemon(home)
    yield d
    d.stop()


def wait_step(d, tid, step=1, timeout=120):
    return d.wait_for(lambda m: m.get("method") == "generation_progress" and
                      m["params"]["track_id"] == tid and m["params"]["step"] >= step,
                      timeout, f"step {step} of {tid}")


def test_generate_progress_complete_and_cached(daemon, home):
    t = time.monotonic()
    res = daemon.call("generate", dict(REQ_LONG, seed=1234))
    assert time.monotonic() - t < 0.5
    assert res["status"] == "queued" and res["seed"] == 1234
    tid = res["track_id"]
    pings = []
    while not daemon.ended(tid):
        t = time.monotonic()
        daemon.call("ping")
        pings.append(time.monotonic() - t)
        time.sleep(0.05)
    # The daemon answers from its reader thread while the worker computes (MLX and numpy release
    # the GIL): a held GIL would show up as gaps as long as a whole network call (seconds for the
    # vocoder here). On a loaded 2-core test machine the OS scheduler alone adds occasional
    # 100-250 ms stalls, seen by an unrelated process too, so the 100 ms bound is held for 95% of
    # pings and every ping must come back within 0.5 s. test_daemon_jobs holds all pings < 100 ms.
    pings.sort()
    assert len(pings) >= 10
    assert pings[int(0.95 * len(pings))] < 0.1 and pings[-1] < 0.5, pings[-5:]
    kind, done = daemon.end(tid)
    assert kind == "complete", done
    prog = daemon.events("generation_progress", tid)
    pct = [p["percent"] for p in prog]
    assert pct == sorted(pct) and max(pct) <= 99 and len(prog) >= 3
    order = ["text_encoding", "diffusion", "dcae_decode", "vocoder", "writing"]
    seen = [order.index(p["stage"]) for p in prog]  # at most 4/s: a quick stage may be skipped
    assert seen == sorted(seen)

    data, sr = sf.read(done["path"], dtype="float32")
    assert sr == 48000 and data.shape == (5 * 48000, 2)
    assert np.all(np.isfinite(data)) and 0 < np.abs(data).max() <= 1.0
    assert done["sample_rate"] == 48000 and done["duration_sec"] == 5.0
    assert (done["engine"], done["device"], done["precision"]) == ("mlx", "cpu", "fp32")
    assert done["model_version"] == "ace-step-v1-3.5b" and done["infer_steps"] == 12

    n = len(daemon.lines)
    again = daemon.call("generate", dict(REQ_LONG, seed=1234))
    assert again == {"track_id": tid, "status": "cached", "position": 0, "seed": 1234, "backend": "ace-step"}
    cached = daemon.wait_for(lambda m: m.get("method") == "generation_complete", 5, start=n)["params"]
    assert cached["cached"] is True and cached["path"] == done["path"]
    assert staging_files(home) == []


def test_cancel_running_job(daemon, home):
    before = set(track_files(home))
    res = daemon.call("generate", dict(REQ, infer_steps=200, seed=99))
    tid = res["track_id"]
    wait_step(daemon, tid, 1)
    st = daemon.call("status")
    assert st["running"]["track_id"] == tid and "transformer" in st["loaded"]
    t = time.monotonic()
    assert daemon.call("cancel", {"track_id": tid})["was_running"] is True
    kind, c = daemon.end(tid, timeout=30)
    assert kind == "cancelled" and 1 <= c["at_step"] < 200
    assert time.monotonic() - t < 5  # within one step of the tiny model
    assert set(track_files(home)) == before and staging_files(home) == []
    st = daemon.call("status")
    assert st["running"] is None and st["loaded"] == []  # the job's networks were released


def test_stdin_close_mid_generation(tmp_path):
    home = make_home(tmp_path)
    d = Daemon(home)
    try:
        res = d.call("generate", dict(REQ, infer_steps=200, seed=5))
        wait_step(d, res["track_id"], 1)
        t0 = time.monotonic()
        d.close_stdin()
        assert d.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 1.0
        assert track_files(home) == [] and staging_files(home) == []
    finally:
        d.stop()


def test_missing_checkpoint(tmp_path):
    home = make_home(tmp_path, checkpoint=False)
    with Daemon(home) as d:
        r = d.request("generate", dict(REQ, seed=1))
        assert r["error"]["code"] == -32001 and r["error"]["data"]["code"] == "MODEL_NOT_FOUND"
        assert "lofi setup ace-step" in r["error"]["message"]
        b = {x["name"]: x for x in d.call("get_backends")["backends"]}
        assert b["ace-step"]["state"] == "not_installed"
        # a partial checkpoint (one component folder missing) is damaged: set up again to repair
        shutil.copytree(CHECKPOINT, home / "ace-step")
        shutil.rmtree(home / "ace-step" / "music_vocoder")
        r = d.request("generate", dict(REQ, seed=1))
        assert r["error"]["data"]["code"] == "MODEL_LOAD_FAILED" and "music_vocoder" in r["error"]["message"]
        assert "lofi setup ace-step" in r["error"]["message"]
        assert d.call("ping")


def test_damaged_checkpoint(tmp_path):
    home = make_home(tmp_path, checkpoint=False)
    ckpt = home / "ace-step"
    shutil.copytree(CHECKPOINT, ckpt)
    with Daemon(home) as d:
        # a truncated weight file: caught before anything is queued
        dit = ckpt / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"
        good = dit.read_bytes()
        dit.write_bytes(good[: len(good) // 2])
        r = d.request("generate", dict(REQ, seed=1))
        assert r["error"]["code"] == -32002 and r["error"]["data"]["code"] == "MODEL_LOAD_FAILED"
        assert {x["name"]: x for x in d.call("get_backends")["backends"]}["ace-step"]["state"] == "damaged"
        dit.write_bytes(good)

        # well-formed files with a tensor missing: found when the network loads, during the job
        umt5 = ckpt / "umt5-base" / "model.safetensors"
        tensors = load_file(umt5)
        umt5.unlink()
        save_file({k: v for k, v in tensors.items() if k != sorted(tensors)[-1]}, str(umt5))
        res = d.call("generate", dict(REQ, seed=2))
        kind, err = d.end(res["track_id"], timeout=120)
        assert kind == "error" and err["code"] == "MODEL_LOAD_FAILED", err
        assert d.call("ping")

        # repaired: the next job re-reads the checkpoint and succeeds
        shutil.copyfile(CHECKPOINT / "umt5-base" / "model.safetensors", umt5)
        n = len(d.lines)
        again = d.call("generate", dict(REQ, seed=2))
        assert again["track_id"] == res["track_id"] and again["status"] == "queued"
        m = d.wait_for(lambda m: m.get("method") in ("generation_complete", "generation_error"), 120, start=n)
        assert m["method"] == "generation_complete", m


def test_settings_reach_the_engine(tmp_path, daemon):
    """fp16 and FLAC from the environment: the engine computes in fp16, the file is FLAC, and
    the track id differs from the fp32 track of the same request."""
    home = make_home(tmp_path)
    env = {"LOFI_PRECISION": "fp16", "LOFI_FORMAT": "flac", "LOFI_ENGINE": "mlx", "LOFI_DEVICE": "cpu",
           "LOFI_THREADS": "1"}
    with Daemon(home, env=env) as d:
        res = d.call("generate", dict(REQ_LONG, seed=1234))
        kind, done = d.end(res["track_id"], timeout=120)
        assert kind == "complete", done
        assert (done["precision"], done["format"], done["device"]) == ("fp16", "flac", "cpu")
        info = sf.info(done["path"])
        assert done["path"].endswith(".flac") and info.format == "FLAC"
        assert (info.samplerate, info.channels, info.frames) == (48000, 2, 5 * 48000)
    fp32 = daemon.call("generate", dict(REQ_LONG, seed=1234))  # the module daemon's fp32 track
    assert fp32["status"] == "cached" and fp32["track_id"] != res["track_id"]

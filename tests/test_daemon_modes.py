"""The daemon's `generate` with the audio-input tasks (tiny model, real daemon process)."""

import shutil

import numpy as np
import pytest
import soundfile as sf

from tests.daemon_util import Daemon, make_home

pytest.importorskip("mlx.core")

SRC = __import__("tests.conftest", fromlist=["FIXTURES"]).FIXTURES / "ace_step_tiny_modes" / "source_audio.wav"
BASE = {"prompt": "lofi hip hop, jazzy piano", "infer_steps": 3}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("modes"))


@pytest.fixture(scope="module")
def daemon(home):
    d = Daemon(home)
    yield d
    d.stop()


def run(d, params):
    res = d.call("generate", params)
    kind, done = d.end(res["track_id"], timeout=300)
    assert kind == "complete", done
    return res, done


def test_extend_a_cached_track_by_its_id(daemon):
    # the radio's use: continue a generated track without a seam
    _, first = run(daemon, dict(BASE, duration_sec=5, seed=3))
    res, ext = run(daemon, dict(BASE, task="extend", src_audio=first["track_id"], right_sec=1.5,
                                seed=4, retake_seed=5))
    data, sr = sf.read(ext["path"], dtype="float32")
    assert sr == 48000 and data.shape == (round(6.5 * 48000), 2) and np.all(np.isfinite(data))
    assert ext["duration_sec"] == 6.5
    # same request, same source content, explicit seeds: answered from the cache
    again = daemon.call("generate", dict(BASE, task="extend", src_audio=first["track_id"],
                                         right_sec=1.5, seed=4, retake_seed=5))
    assert again["status"] == "cached" and again["track_id"] == res["track_id"]


def test_source_tasks_key_on_content_not_path(daemon, tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    shutil.copy(SRC, a)
    shutil.copy(SRC, b)
    req = dict(BASE, task="repaint", start_sec=0.4, end_sec=1.2, seed=1, retake_seed=2,
               duration_sec=30)  # duration is ignored: the source fixes the length
    ra, done = run(daemon, dict(req, src_audio=str(a)))
    assert sf.info(done["path"]).frames == 96000
    rb = daemon.call("generate", dict(req, src_audio=str(b)))
    assert rb["track_id"] == ra["track_id"] and rb["status"] == "cached"
    w, sr = sf.read(str(SRC), dtype="float32")
    sf.write(str(b), w * 0.5, sr, subtype="FLOAT")
    rc = daemon.call("generate", dict(req, src_audio=str(b)))
    assert rc["track_id"] != ra["track_id"]
    daemon.end(rc["track_id"], timeout=300)


@pytest.mark.parametrize("params,field,needle", [
    ({"task": "repaint", "src_audio": "/nonexistent/x.wav", "start_sec": 0, "end_sec": 1},
     "src_audio", "does not exist"),
    ({"task": "repaint", "src_audio": str(SRC), "start_sec": 1, "end_sec": 9}, "end_sec", "ends after"),
    ({"task": "extend", "src_audio": str(SRC)}, "right_sec", "above 0"),
    ({"task": "edit", "src_audio": str(SRC)}, "target_prompt", "target prompt"),
    ({"task": "audio2audio", "src_audio": str(SRC), "strength": 2}, "strength", "strength"),
    ({"task": "text2music", "duration_sec": 5, "lora": "missing"}, "lora", "no adapter"),
    ({"task": "text2music", "duration_sec": 5, "src_sha256": "0" * 64}, "src_sha256", "unknown"),
])
def test_bad_mode_requests_are_invalid_params(daemon, params, field, needle):
    r = daemon.request("generate", dict(BASE, **params))
    err = r["error"]
    assert err["code"] == -32602 and err["data"]["field"] == field, err
    assert needle in err["message"], err
    assert daemon.call("ping")  # still serving

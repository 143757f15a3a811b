"""`lofi generate --task ...` end to end on the tiny model, its lengths, seeds and refusals."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import CHECKPOINT, FIXTURES

MODES = FIXTURES / "ace_step_tiny_modes"
SRC = MODES / "source_audio.wav"   # 2.0 s, 48 kHz stereo float
LOFI = [sys.executable, "-m", "lofi.cli"]


def lofi(*args, home):
    env = dict(os.environ, LOFI_HOME=str(home))
    return subprocess.run(LOFI + list(args), capture_output=True, text=True, env=env, timeout=600)


def gen(home, out, *extra, seed="7"):
    return lofi("generate", "--checkpoint", str(CHECKPOINT), "--prompt", "lofi hip hop, rain",
                "--steps", "4", "--seed", seed, "--out", str(out), *extra, home=home)


@pytest.fixture()
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def frames(path):
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (48000, 2)
    return info.frames


@pytest.mark.parametrize("args,seconds", [
    (["--task", "repaint", "--src", str(SRC), "--start", "0.5", "--end", "1.2"], 2.0),
    (["--task", "extend", "--src", str(SRC), "--left", "0.5", "--right", "1.25"], 3.75),
    (["--task", "extend", "--src", str(SRC), "--right", "0.3"], 2.3),
    (["--task", "audio2audio", "--src", str(SRC), "--strength", "0.5"], 2.0),
    (["--task", "edit", "--src", str(SRC), "--target-prompt", "synthwave", "--edit-n-min", "0.2",
      "--edit-n-max", "0.6"], 2.0),
    (["--task", "retake", "--duration", "5", "--retake-seed", "3", "--variance", "0.2"], 5.0),
])
def test_each_task_writes_the_exact_length(home, tmp_path, args, seconds):
    out = tmp_path / "t.wav"
    r = gen(home, out, *args)
    assert r.returncode == 0, r.stderr
    assert frames(out) == round(seconds * 48000)
    w, _ = sf.read(str(out))
    assert np.all(np.isfinite(w)) and np.abs(w).max() > 0


def test_same_seeds_same_file_and_source_by_track_id(home, tmp_path):
    # a source given as a cached track id resolves to tracks/<id>.wav
    (home / "tracks").mkdir()
    shutil.copy(SRC, home / "tracks" / "0123456789abcdef.wav")
    a, b, c = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    base = ["--task", "repaint", "--start", "0.3", "--end", "1.0", "--retake-seed", "9"]
    assert gen(home, a, *base, "--src", str(SRC)).returncode == 0
    assert gen(home, b, *base, "--src", "0123456789abcdef").returncode == 0
    assert a.read_bytes() == b.read_bytes()
    r = gen(home, c, "--task", "repaint", "--start", "0.3", "--end", "1.0", "--retake-seed", "10",
            "--src", str(SRC))
    assert r.returncode == 0 and c.read_bytes() != a.read_bytes()


def test_lora_by_name_and_lora_list(home, tmp_path):
    r = lofi("lora", "list", home=home)
    assert r.returncode == 0 and "no LoRA adapters" in r.stdout
    (home / "lora" / "tiny").mkdir(parents=True)
    shutil.copy(MODES / "lora" / "pytorch_lora_weights.safetensors", home / "lora" / "tiny")
    r = lofi("lora", "list", home=home)
    assert r.returncode == 0 and r.stdout.startswith("tiny\t")
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    assert gen(home, a, "--duration", "5", "--lora", "tiny:0.5").returncode == 0
    assert gen(home, b, "--duration", "5").returncode == 0
    assert frames(a) == frames(b) == 240000 and a.read_bytes() != b.read_bytes()


@pytest.fixture()
def long_sources(tmp_path):
    # sf.info is all resolve reads, so long sources stay cheap at 8 kHz mono
    long_ok = tmp_path / "long239.wav"
    sf.write(str(long_ok), np.zeros(239 * 8000, np.int16), 8000, subtype="PCM_16")
    too_long = tmp_path / "long241.wav"
    sf.write(str(too_long), np.zeros(241 * 8000, np.int16), 8000, subtype="PCM_16")
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio at all")
    return {"ok239": long_ok, "long": too_long, "junk": junk}


@pytest.mark.parametrize("args,needle", [
    (["--task", "repaint", "--src", "{missing}", "--start", "0", "--end", "1"], "does not exist"),
    (["--task", "repaint", "--src", "{junk}", "--start", "0", "--end", "1"], "cannot decode"),
    (["--task", "repaint", "--src", "{long}", "--start", "0", "--end", "1"], "at most 240"),
    (["--task", "repaint", "--src", str(SRC), "--start", "1.5", "--end", "3"], "ends after the source"),
    (["--task", "repaint", "--src", str(SRC), "--start", "1.0", "--end", "0.5"], "after start_sec"),
    (["--task", "repaint", "--src", str(SRC), "--start", "1.0", "--end", "1.02"], "one latent frame"),
    (["--task", "repaint", "--src", str(SRC)], "start_sec"),
    (["--task", "extend", "--src", "{ok239}", "--right", "2"], "over 240"),
    (["--task", "extend", "--src", str(SRC)], "above 0"),
    (["--task", "audio2audio", "--src", str(SRC), "--strength", "1.0"], "strength"),
    (["--task", "edit", "--src", str(SRC)], "target prompt"),
    (["--task", "repaint", "--start", "0", "--end", "1"], "needs a source"),
    (["--task", "extend", "--src", str(SRC), "--right", "1", "--duration", "10"], "does not apply"),
    (["--duration", "5", "--src", str(SRC)], "does not apply to task text2music"),
    (["--task", "retake", "--duration", "5", "--variance", "1.5"], "retake_variance"),
    (["--task", "remix", "--duration", "5"], "invalid choice"),
    (["--duration", "5", "--lora", "nosuch"], "no adapter"),
    (["--task", "0123456789abcdef"], "invalid choice"),
    (["--task", "repaint", "--src", "0123456789abcdef", "--start", "0", "--end", "1"], "no cached track"),
])
def test_bad_input_exit_2_and_no_file(home, tmp_path, long_sources, args, needle):
    paths = dict(long_sources, missing=tmp_path / "nope.wav")
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    out = tmp_path / "out" / "x.wav"
    out.parent.mkdir()
    r = gen(home, out, *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr, r.stderr[-2000:]
    assert not list(out.parent.iterdir())  # no output, no temporary left behind

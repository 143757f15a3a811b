"""`python -m lofi_mlx.verify` (and `python -m lofi.verify`) on the fixtures, and on a doctored copy (it must fail there)."""

import json
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from lofi.checkpoint import load_safetensors
from tests.conftest import GOLDEN


def verify(path, *extra):
    return subprocess.run([sys.executable, "-m", "lofi.verify", str(path), *extra],
                          capture_output=True, text=True, timeout=900)


def test_verify_passes_on_fixtures():
    r = verify(GOLDEN)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    names = {line.split()[1].split(":")[0] for line in lines if line.startswith("PASS")}
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    expected = {f.rsplit(".", 1)[0] for f in manifest["files"] if f.endswith(".safetensors")}
    assert names == expected  # every golden file was checked
    assert lines[-1].split()[1:3] == ["passed,", "0"]


def test_verify_fails_on_a_wrong_golden(tmp_path):
    dst = tmp_path / "set"
    dst.mkdir()
    for f in ("manifest.json", "vocoder.safetensors", "resample.safetensors"):
        shutil.copy(GOLDEN / f, dst / f)
    (dst / "checkpoint").symlink_to(GOLDEN / "checkpoint")
    g = load_safetensors(dst / "vocoder.safetensors")
    g = {k: np.array(v) for k, v in g.items()}
    g["decode.out"][..., 100] += 1e-2
    save_file(g, str(dst / "vocoder.safetensors"))
    m = json.loads((dst / "manifest.json").read_text())
    m["files"] = {k: v for k, v in m["files"].items() if k in ("vocoder.safetensors", "resample.safetensors")}
    (dst / "manifest.json").write_text(json.dumps(m))
    r = verify(dst)
    assert r.returncode == 1, r.stdout
    assert "FAIL  vocoder:decode.out" in r.stdout
    assert "PASS  resample:r44100_48000" in r.stdout

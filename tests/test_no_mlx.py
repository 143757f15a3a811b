"""Without mlx: an environment where mlx cannot be imported runs `lofi-daemon` on the ONNX engine.

The environment is a fresh venv whose only packages are links to this interpreter's packages,
minus every `mlx*` entry (no network: the same installed wheels, without mlx).
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import soundfile as sf

from tests.conftest import CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent


def venv_without_mlx(tmp: Path) -> Path:
    linked = tmp / "site"
    linked.mkdir()
    for sp in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + site.getsitepackages():
        for entry in Path(sp).iterdir() if Path(sp).is_dir() else []:
            if entry.name.lower().startswith("mlx") or (linked / entry.name).exists():
                continue
            if entry.suffix == ".pth" and "mlx" in entry.read_text(errors="ignore"):
                continue
            (linked / entry.name).symlink_to(entry)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "lofi_links.pth").write_text(f"{linked}\n{ROOT}\n")
    return py


def test_daemon_generates_with_onnx_and_no_mlx(tmp_path):
    py = venv_without_mlx(tmp_path)
    r = subprocess.run([str(py), "-c", "import importlib.util as u; import lofi.engines as e;"
                        "print(u.find_spec('mlx'), e.default_engine())"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "onnx"]

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(CHECKPOINT, home / "ace-step")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOFI_")}
    env.update(LOFI_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(py), "-m", "lofi.daemon"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)

    def send(rid, method, params=None):
        msg = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        proc.stdin.flush()

    def until(pred, timeout=600):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = proc.stdout.readline()
            assert line, "daemon exited: " + proc.stderr.read().decode()[-3000:]
            msg = json.loads(line)
            if pred(msg):
                return msg
        raise AssertionError("timed out")

    try:
        send(1, "generate", {"prompt": "lofi hip hop", "duration_sec": 5, "infer_steps": 2, "seed": 5})
        ans = until(lambda m: m.get("id") == 1)
        assert ans["result"]["status"] in ("queued", "generating"), ans
        done = until(lambda m: m.get("method") in ("generation_complete", "generation_error"))
        assert done["method"] == "generation_complete", done
        p = done["params"]
        assert p["engine"] == "onnx", p
        info = sf.info(p["path"])
        assert (info.samplerate, info.channels, info.frames) == (48000, 2, 240000)
        send(2, "status")
        st = until(lambda m: m.get("id") == 2)["result"]
        assert st["engine"] == "onnx" and st["device"] == "cpu", st
        send(3, "shutdown")
        until(lambda m: m.get("id") == 3)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cuda_install_does_not_pull_mlx():
    import tomllib
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in proj["dependencies"] + proj["optional-dependencies"]["cuda"]:
        assert not req.lower().startswith("mlx"), req
    assert any(r.startswith("onnxruntime-gpu") for r in proj["optional-dependencies"]["cuda"])
    assert any(r.startswith("mlx") for r in proj["optional-dependencies"]["mlx"])


def test_cli_generates_with_onnx_and_no_mlx(tmp_path):
    py = venv_without_mlx(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOFI_")}
    env.update(LOFI_HOME=str(tmp_path / "home"))
    out = tmp_path / "t.wav"
    r = subprocess.run([str(py), "-m", "lofi.cli", "generate", "--checkpoint", str(CHECKPOINT),
                        "--prompt", "rain", "--duration", "5", "--steps", "2", "--seed", "3",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 240000)
    r = subprocess.run([str(py), "-c", "import sys, lofi.cli, lofi.daemon.server, lofi.hub.setup, "
                        "lofi.acestep.pipeline; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                        "('mlx', 'onnxruntime', 'torch', 'lofi_mlx', 'lofi_cuda', 'convert')))"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)

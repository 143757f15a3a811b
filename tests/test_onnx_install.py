"""The documented ONNX install, end to end: a venv holding exactly `lofi[onnx-cpu,play,setup]` (no
torch, no mlx) runs `lofi setup ace-step` against the loopback Hub, then `lofi generate` writes a
track.

The `onnx-cpu` extra stands in for `cuda`: they differ only in onnxruntime vs onnxruntime-gpu
(255 MB, and this machine has no GPU), and both bring `onnx`, which builds the graphs.

Why not `pip install` into a fresh venv: tests never touch the network and the wheels would be
fetched every run. Instead the venv's site-packages is the dependency closure of those extras,
resolved from pyproject.toml through the installed distributions' metadata and linked from this
interpreter's site-packages: the same wheels pip would install, and nothing else (torch and mlx,
present here for other tests, are absent there). Building it takes a second.
"""

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import soundfile as sf

from tests.conftest import CHECKPOINT
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("onnx-cpu", "play", "setup")
REV = "c3" * 20


def _closure(requirements: list[str]) -> dict[str, md.Distribution]:
    from packaging.requirements import Requirement
    todo = [(Requirement(r), "") for r in requirements]
    seen: dict[str, md.Distribution] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise AssertionError(f"{req.name} (needed by lofi[{','.join(EXTRAS)}]) is not installed here")
        seen[key] = dist
        for extra_name in [""] + sorted(req.extras):
            todo += [(Requirement(r), extra_name) for r in dist.requires or []]
    return seen


def venv_with_extras(tmp: Path) -> tuple[Path, list[str]]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for e in EXTRAS for r in proj["optional-dependencies"][e]]
    dists = _closure(reqs)
    linked = tmp / "site"
    linked.mkdir()
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = base / top
            if src.exists() and not (linked / top).exists():
                (linked / top).symlink_to(src)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "lofi_links.pth").write_text(f"{linked}\n{ROOT}\n")
    return py, sorted(dists)


def test_onnx_cpu_install_sets_up_and_generates_without_torch(tmp_path):
    py, dists = venv_with_extras(tmp_path)
    assert "onnx" in dists and "onnxruntime" in dists
    assert not any(d.startswith(("torch", "mlx", "nvidia")) for d in dists), dists
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in "
                            "('torch', 'mlx', 'onnx', 'onnxruntime') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[0] == "['onnx', 'onnxruntime']"

    home = tmp_path / "home"
    with HubServer() as hub:
        hub.add_folder(REV, CHECKPOINT)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOFI_", "HF_", "PYTHON"))}
        user = tmp_path / "user"   # the user's own home: nothing may be written there
        env.update(HOME=str(user), XDG_CACHE_HOME=str(user / ".cache"), LOFI_HOME=str(home), HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"),
                   NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env.pop(var, None)

        def lofi(*args):
            return subprocess.run([str(py), "-m", "lofi.cli", *args], capture_output=True, text=True,
                                  env=env, cwd=tmp_path, timeout=600)

        r = lofi("setup", "ace-step", "--yes", "--quiet", "--revision", REV)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "to build the ONNX graphs (fp32)" in r.stderr
        assert "ACE-Step is ready" in r.stderr and "built onnx/fp32" in r.stderr, r.stderr[-2000:]
        assert (home / "ace-step" / "onnx" / "fp32" / "manifest.json").is_file()

        out = tmp_path / "track.wav"
        r = lofi("generate", "--prompt", "lofi piano, rain", "--duration", "5", "--steps", "2",
                 "--seed", "7", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (user / ".cache" / "lofi").exists()  # graphs live under LOFI_HOME only
    assert "onnx/cpu/fp32" in r.stderr and "building" not in r.stderr
    info = sf.info(str(out))
    assert (info.samplerate, info.channels) == (48000, 2) and info.frames == 5 * 48000

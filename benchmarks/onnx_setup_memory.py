"""Peak memory of `lofi setup ace-step --engine onnx` on a full-size checkpoint, against a loopback Hub.

    python benchmarks/onnx_setup_memory.py CHECKPOINT [--precision fp32|fp16] [--work DIR]

CHECKPOINT is a folder in the Hugging Face layout of ACE-Step/ACE-Step-v1-3.5B (the real
download, or a synthetic one with the real shapes and BF16 files). A loopback stand-in for the
Hub (tests/hub_server.py) serves it straight from disk (memory-mapped, so the server holds no
copy), and a child process runs the documented command: download, verify, build the ONNX
graphs (lofi_cuda.build). Reported: the child's peak resident set size (getrusage of the
children), wall time, the size of the graphs, and whether torch was ever imported there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hub_server import HubServer, _File, git_blob_sha1  # noqa: E402

REV = "f0" * 20


def _from_disk(rel: str, path: Path) -> _File:
    """A served file backed by a memory map: hashed in chunks, never read whole into memory."""
    f = _File.__new__(_File)
    f.path, f.lfs = rel, rel.endswith(".safetensors")
    f.data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    f.sha256 = h.hexdigest()
    size = path.stat().st_size
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {size}\n".encode()
    f.blob_id = git_blob_sha1(pointer) if f.lfs else git_blob_sha1(path.read_bytes())
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    ap.add_argument("--work", type=Path, default=None, help="LOFI_HOME to install into (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the installed files")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lofi-setup-mem-"))
    hub = HubServer()
    files = {str(p.relative_to(args.checkpoint)): p for p in sorted(args.checkpoint.rglob("*"))
             if p.is_file() and "onnx" not in p.relative_to(args.checkpoint).parts[:1]}
    t0 = time.perf_counter()
    hub.revisions[REV] = {rel: _from_disk(rel, p) for rel, p in files.items()}
    hub.branches["main"] = REV
    print(f"serving {len(files)} files ({sum(p.stat().st_size for p in files.values()) / 1e9:.2f} GB), "
          f"hashed in {time.perf_counter() - t0:.0f} s", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOFI_", "HF_"))}
    probe = ("import sys, runpy; sys.argv = ['lofi'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('lofi.cli', run_name='__main__')\n"
             "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")
    with hub:
        env.update(LOFI_HOME=str(work), HF_ENDPOINT=hub.endpoint, HF_HOME=str(work / "hf"),
                   NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", probe, "setup", "ace-step", "--yes", "--quiet",
                            "--engine", "onnx", "--precision", args.precision, "--revision", REV],
                           env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    graphs = work / "ace-step" / "onnx"
    size = sum(f.stat().st_size for f in graphs.rglob("*") if f.is_file()) if graphs.is_dir() else 0
    out = {"returncode": r.returncode, "peak_rss_gb": round(peak / 2**30, 3), "wall_s": round(wall, 1),
           "graphs_gb": round(size / 1e9, 2), "precision": args.precision,
           "torch_imported": "torch imported: True" in r.stderr, "tail": r.stderr[-600:]}
    print(json.dumps(out, indent=1))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

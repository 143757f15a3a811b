"""Where a MusicGen decoder step's time goes on this CPU, per engine and thread setting.

    python benchmarks/musicgen_step_profile.py CHECKPOINT [--threads 1 2] [--engines onnx mlx]
                                               [--prefill 100] [--steps 20]

For each engine and thread count (one process each): a 2-row (cond + null) decoder session,
a prefill of `--prefill` columns, then `--steps` one-column steps; reported per step (median,
ms): the decoder call (network + the engine's cache handling), the numpy sampler (CFG, top-k 250,
softmax, draw) and, for ONNX, session.run alone. Also a bare GEMV pass over the step's weight
bytes (torch, same threads) as the memory-traffic floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def worker(ckpt: str, engine: str, threads: int, prefill: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from lofi.engines import create_engine
    from lofi.musicgen.sampler import SamplingParams, TokenSampler, process
    eng = create_engine(ckpt, engine, "fp32", "cpu", threads=threads, backend="musicgen")
    if engine == "onnx":
        eng.graph_dir()
    cfg = eng.config
    k, h = cfg.decoder.num_codebooks, cfg.decoder.hidden_size
    enc = np.random.default_rng(0).standard_normal((2, 12, h)).astype(np.float32)
    enc[1] = 0
    mask = np.ones((2, 12), np.int64)
    mask[1] = 0
    t0 = time.perf_counter()
    sess = eng.decoder_session(enc, mask)
    start = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    sess(rng.integers(0, 2048, (2 * k, prefill)))
    runs = []
    if engine == "onnx":  # session.run's own share: wrap the session once it exists
        ort_sess = eng._session("decoder", "mg_decoder")
        real = ort_sess.run

        def timed(*a, **kw):
            t = time.perf_counter()
            out = real(*a, **kw)
            runs.append(time.perf_counter() - t)
            return out
        ort_sess.run = timed
    p, choose = SamplingParams(), TokenSampler(1)
    call, samp = [], []
    for _ in range(steps):
        ids = rng.integers(0, 2048, (2 * k, 1))
        t = time.perf_counter()
        raw = sess(ids)
        t1 = time.perf_counter()
        choose(process(raw, p), raw, 0)
        samp.append(time.perf_counter() - t1)
        call.append(t1 - t)
    med = lambda xs: 1e3 * statistics.median(xs) if xs else None  # noqa: E731
    return {"engine": engine, "threads": threads, "session_start_ms": 1e3 * start,
            "call_ms": med(call), "run_ms": med(runs), "sampler_ms": med(samp)}


def floor(ckpt: str, threads: int) -> dict:
    """Weight bytes one step reads (self-attn, cross q/out, FFN, heads) through torch GEMVs."""
    import torch
    torch.set_num_threads(threads)
    cfg = json.loads((Path(ckpt) / "config.json").read_text())["decoder"]
    h, f, n = cfg["hidden_size"], cfg["ffn_dim"], cfg["num_hidden_layers"]
    ws = [torch.randn(h, h) for _ in range(6 * n)] + [torch.randn(f, h), torch.randn(h, f)] * n
    ws += [torch.randn(cfg["vocab_size"], h) for _ in range(cfg["num_codebooks"])]
    x, xf = torch.randn(2, h), torch.randn(2, f)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for w in ws:
            torch.nn.functional.linear(xf if w.shape[1] == f else x, w)
        times.append(time.perf_counter() - t)
    gb = sum(w.numel() for w in ws) * 4 / 1e9
    return {"engine": "torch GEMV floor", "threads": threads, "call_ms": 1e3 * min(times),
            "weight_gb": gb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["onnx", "mlx"], choices=("onnx", "mlx", "floor"))
    ap.add_argument("--prefill", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for e in a.engines:
        for t in a.threads:
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(t))
            r = subprocess.run([sys.executable, __file__, "--worker", a.checkpoint, e, str(t),
                                str(a.prefill), str(a.steps)], capture_output=True, text=True, env=env)
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{'engine':<18}{'threads':>8}{'step ms':>10}{'run ms':>10}{'sampler ms':>12}")
    for r in rows:
        print(f"{r['engine']:<18}{r['threads']:>8}{fmt(r['call_ms']):>10}{fmt(r.get('run_ms')):>10}"
              f"{fmt(r.get('sampler_ms')):>12}")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        c, e, t, p, s = sys.argv[2:7]
        r = floor(c, int(t)) if e == "floor" else worker(c, e, int(t), int(p), int(s))
        print(json.dumps(r))
        sys.exit(0)
    sys.exit(main())

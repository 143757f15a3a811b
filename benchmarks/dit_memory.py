"""A long DiT step's memory and time on the MLX engine (issue 11), two ways.

    PYTHONPATH=. python benchmarks/dit_memory.py block [--seconds 240] [--rows 2] [--chunks 0 512]
        [--rounds 2]
    PYTHONPATH=. python benchmarks/dit_memory.py stage --native DIR [--seconds 240]
        [--cache-limit-gib G]

`block`: one transformer block at the real widths (random weights), the residual stream of
`--rows` rows at the given length; each feed-forward chunk setting (0 = whole length) timed in
turns, with MLX's peak of temporaries above the inputs.
`stage`: the text encoder and a 2-step sampling run (one guided, one unguided step) through the
pipeline on a checkpoint with MLX-native weights (e.g. `--synthetic full`'s cache folder), fp32,
CPU: step times and the process's peak RSS (VmHWM) and MLX's peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lofi.audio import frames_for_duration as frames  # noqa: E402

G = 2 ** 30


def block(args) -> list:
    from mlx.utils import tree_map

    from lofi.acestep.configs import DiTConfig
    from lofi_mlx.acestep import dit
    from lofi_mlx.mlxrt import mx
    cfg, T, B = DiTConfig(), frames(args.seconds), args.rows
    blk = dit.DiTBlock(cfg)
    blk.update(tree_map(lambda a: mx.random.normal(a.shape) * 0.02, blk.parameters()))
    h = mx.random.normal((B, T, cfg.width))
    temb6 = mx.random.normal((B, 6, cfg.width)) * 0.1
    kv = blk.cross_attn.kv(mx.random.normal((B, 64, cfg.width)),
                           *dit.rope_tables(64, cfg.head_dim, cfg.rope_theta, "fp32"))
    rope = dit.rope_tables(T, cfg.head_dim, cfg.rope_theta, "fp32")
    keep = mx.ones((B, 64), mx.bool_)[:, None, None, :]
    mx.eval(blk.parameters(), h, temb6, kv)
    rows = []
    for rnd in range(args.rounds):
        for chunk in args.chunks:
            dit.FF_CHUNK = chunk or 10 ** 9
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            mx.eval(blk(h, temb6, rope, kv, keep, None))
            row = {"round": rnd, "chunk": chunk, "frames": T, "rows": B,
                   "seconds": round(time.perf_counter() - t0, 3),
                   "temporaries_peak": int(mx.get_peak_memory() - base)}
            rows.append(row)
            print(f"chunk {chunk or 'whole':>5}: {row['seconds']:.2f} s, temporaries "
                  f"{row['temporaries_peak'] / G:.2f} GiB", flush=True)
    return rows


def stage(args) -> list:
    from lofi.acestep.pipeline import Pipeline
    from lofi.params import GenerateParams
    from lofi_mlx.engine import MLXEngine
    from lofi_mlx.mlxrt import mx
    if args.cache_limit_gib is not None:
        mx.set_cache_limit(int(args.cache_limit_gib * G))
    eng = MLXEngine(args.native.parent, "fp32", "cpu", native_dir=args.native)
    pipe = Pipeline(args.native.parent, eng)
    p = GenerateParams("lofi hip hop", args.seconds, infer_steps=2, seed=1).validate()
    marks = []
    t0 = time.monotonic()
    pipe.latents(p, progress=lambda st, step, total, frac: marks.append((time.monotonic() - t0, st, step)))
    steps = [t for t, st, step in marks if st == "diffusion"]
    hwm = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM"))
    row = {"seconds_audio": args.seconds, "frames": frames(args.seconds),
           "step_seconds": [round(b - a, 1) for a, b in zip(steps, steps[1:])],
           "peak_rss": hwm, "mlx_peak": int(mx.get_peak_memory()),
           "cache_limit_gib": args.cache_limit_gib}
    print(f"{args.seconds:.0f} s: steps {row['step_seconds']} s (guided, unguided); peak RSS "
          f"{hwm / G:.2f} GiB, MLX peak {row['mlx_peak'] / G:.2f} GiB", flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["block", "stage"])
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--native", type=Path, help="folder of MLX-native weights (stage)")
    ap.add_argument("--cache-limit-gib", type=float)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.mode == "stage" and args.native is None:
        ap.error("stage needs --native")
    rows = block(args) if args.mode == "block" else stage(args)
    if args.json:
        meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

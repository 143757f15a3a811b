"""Quantized DiT weights against the unquantized run: memory, step time and error.

    PYTHONPATH=. python benchmarks/quant_error.py --model goldens|mid|full [--engine mlx|onnx]
        [--bits 8 4] [--group-sizes 32 64 128] [--steps 8] [--seconds 10] [--json OUT]

One fixed job per configuration — the same prompt, seed and noise, Euler + APG, `--steps` steps
(half of them guided) — through the real pipeline (text encoding, conditions, the shared
sampler). Reported per configuration: the DiT's weight bytes as the engine holds them, the
median seconds of a guided step (one batch-2 velocity call at the job's length, after a
warm-up), and the relative L2 error ||q - ref|| / ||ref|| of the final latents and of the
44.1 kHz waveform (both decoded by the same unquantized DCAE and vocoder), and of the DCAE's
mel in between (the goldens' tiny random vocoder barely depends on its input, so there the mel
is the figure that shows the decoders' view).

Models: `goldens` is the golden fixture's checkpoint at the goldens' length (26 frames, 2.5 s);
`mid` and `full` are synthetic checkpoints in the Hugging Face layout (real widths, random
weights; `mid` has 3 DiT layers) written once under $XDG_CACHE_HOME/lofi.nvim/synthetic.
Random weights are a harder case than trained ones for 4-bit (no outliers to fit, but no
redundancy either); the goldens' weights are the reference's perturbed random initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOLDEN_CKPT = ROOT / "tests" / "fixtures" / "ace_step_tiny" / "checkpoint"


def checkpoint(model: str) -> Path:
    if model == "goldens":
        return GOLDEN_CKPT
    from convert.synthetic_hf import write_checkpoint
    from lofi_mlx.synthetic import configs
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lofi.nvim" / "synthetic"
    cfgs, lyric = configs(model)
    os.environ.setdefault("LOFI_ONNX_CACHE", str(base / f"{model}-hf-onnx"))
    return write_checkpoint(base / f"{model}-hf", cfgs, lyric)


def make_engine(name: str, ckpt: Path, bits, group_size):
    if name == "mlx":
        from lofi_mlx.engine import MLXEngine
        eng = MLXEngine(ckpt, "fp32", "cpu", keep_loaded=True, quantize=bits)
        if group_size:
            eng.quantize_group = group_size
        return eng
    from lofi_cuda.engine import ONNXEngine
    return ONNXEngine(ckpt, "fp32", "cpu", keep_loaded=True, quantize=bits)


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def one(name, ckpt, bits, group_size, params, frames, repeats) -> tuple[dict, np.ndarray]:
    from lofi.acestep.pipeline import Pipeline
    eng = make_engine(name, ckpt, bits, group_size)
    pipe = Pipeline(ckpt, eng)
    t0 = time.perf_counter()
    lat = pipe.latents(params, frames=frames)
    job = time.perf_counter() - t0
    ctx, mask = eng.encode_context(np.zeros((1, 5, eng_text_dim(ckpt)), np.float32), np.ones((1, 5), np.int64),
                                   np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
    ctx2, mask2 = np.concatenate([ctx, ctx]), np.concatenate([mask, mask])
    x = np.random.default_rng(0).standard_normal((2, 8, 16, frames)).astype(np.float32)
    t = np.array([500.0, 500.0], np.float32)
    erg = np.array([False, True])
    eng.velocity(x, t, ctx2, mask2, erg)
    per = []
    for _ in range(repeats):
        a = time.perf_counter()
        eng.velocity(x, t, ctx2, mask2, erg)
        per.append(time.perf_counter() - a)
    row = {"bits": bits, "group_size": (group_size or 64) if (bits and name == "mlx") else None,
           "dit_weight_bytes": int(eng.weight_bytes.get("transformer", 0)),
           "guided_step_sec": round(statistics.median(per), 4), "job_latents_sec": round(job, 2),
           "load_sec": round(eng.load_times.get("transformer", 0.0), 2)}
    eng.release()
    return row, lat


def eng_text_dim(ckpt: Path) -> int:
    from lofi.checkpoint import read_config
    return int(read_config(ckpt, "transformer").get("text_embedding_dim", 768))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("goldens", "mid", "full"), default="mid")
    ap.add_argument("--engine", choices=("mlx", "onnx"), default="mlx")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64],
                    help="MLX only (ONNX Runtime's int8 is per tensor)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="job length (goldens: 26 frames)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-audio", action="store_true", help="latents only (skip the decoders)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from lofi.params import GenerateParams
    from lofi_mlx.bench import machine
    ckpt = checkpoint(args.model)
    frames = 26 if args.model == "goldens" else int(args.seconds * 44100 / 4096)
    params = GenerateParams("lofi hip hop, jazzy piano, vinyl crackle", max(5.0, args.seconds),
                            infer_steps=args.steps, seed=1234).validate()
    configs = [(None, None)] + [(b, g) for b in args.bits
                                for g in (args.group_sizes if args.engine == "mlx" else [None])]
    rows, lats = [], []
    for bits, g in configs:
        row, lat = one(args.engine, ckpt, bits, g, params, frames, args.repeats)
        rows.append(row)
        lats.append(lat)
        print(json.dumps(row), flush=True)
    ref_lat = lats[0]
    for row, lat in zip(rows, lats):
        row["latents_rel_l2"] = rel_l2(lat, ref_lat)
    if not args.no_audio:
        dec = make_engine(args.engine, ckpt, None, None)
        mels = [dec.dcae_decode(lat) for lat in lats]
        waves = [dec.vocode(m)[0] for m in mels]
        for row, m, w in zip(rows, mels, waves):
            row["mel_rel_l2"] = rel_l2(m, mels[0])
            row["wave_rel_l2"] = rel_l2(w, waves[0])
    res = {"machine": machine() + " (2-core x86-64 shared with other agents: figures noisy)",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
           "engine": args.engine, "frames": frames, "steps": args.steps,
           "command": "python benchmarks/quant_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    print(f"\n{'bits':>5} {'group':>6} {'DiT weights MiB':>16} {'s/guided step':>14} {'latents rel L2':>15} "
          f"{'mel rel L2':>11} {'wave rel L2':>12}")
    for r in rows:
        print(f"{str(r['bits'] or '-'):>5} {str(r['group_size'] or '-'):>6} {r['dit_weight_bytes'] / 2**20:>16.1f} "
              f"{r['guided_step_sec']:>14.3f} {r['latents_rel_l2']:>15.2e} "
              f"{r.get('mel_rel_l2', float('nan')):>11.2e} {r.get('wave_rel_l2', float('nan')):>12.2e}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

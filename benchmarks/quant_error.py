"""Quantized DiT weights against the unquantized run: memory, step time and error.

    PYTHONPATH=. python benchmarks/quant_error.py --model goldens|mid|full [--engine mlx|onnx]
        [--bits 8 4] [--group-sizes 32 64 128] [--steps 8] [--seconds 10] [--json OUT]

One fixed job per configuration — the same prompt, seed and noise, Euler + APG, `--steps` steps
(half of them guided) — through the real pipeline (text encoding, conditions, the shared
sampler). Reported per configuration: the DiT's weight bytes as the engine holds them, the
median seconds of a guided step (one batch-2 velocity call at the job's length, after a
warm-up; the timed configurations take turns so a busy machine's load falls on all alike), and the relative L2 error ||q - ref|| / ||ref|| of the final latents and of the
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
    from lofi_mlx.bench import hf_synthetic
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lofi.nvim" / "synthetic"
    return hf_synthetic(base / f"{model}-hf", model)


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


def one(name, ckpt, bits, group_size, params, frames, keep: bool):
    """The fixed job's latents; the engine comes back with its DiT resident when `keep`."""
    from lofi.acestep.pipeline import Pipeline
    eng = make_engine(name, ckpt, bits, group_size)
    t0 = time.perf_counter()
    lat = Pipeline(ckpt, eng).latents(params, frames=frames)
    job = time.perf_counter() - t0
    row = {"bits": bits, "group_size": (group_size or 64) if (bits and name == "mlx") else None,
           "dit_weight_bytes": int(eng.weight_bytes.get("transformer", 0)),
           "job_latents_sec": round(job, 2), "load_sec": round(eng.load_times.get("transformer", 0.0), 2)}
    eng.release("text_encoder")
    if not keep:
        eng.release()
        eng = None
    return row, lat, eng


def step_times(engines: list, ckpt: Path, frames: int, repeats: int) -> list[float]:
    """Median seconds of a guided step (batch-2 velocity) per engine, the engines taking turns
    round by round so that the machine's changing load falls on all of them alike."""
    feeds = []
    for eng in engines:
        ctx, mask = eng.encode_context(np.zeros((1, 5, eng_text_dim(ckpt)), np.float32),
                                       np.ones((1, 5), np.int64), np.zeros((1, 1), np.int64),
                                       np.zeros((1, 1), np.int64))
        x = np.random.default_rng(0).standard_normal((2, 8, 16, frames)).astype(np.float32)
        feeds.append((x, np.array([500.0, 500.0], np.float32), np.concatenate([ctx, ctx]),
                      np.concatenate([mask, mask]), np.array([False, True])))
        eng.velocity(*feeds[-1])  # warm-up
    per = [[] for _ in engines]
    for _ in range(repeats):
        for i, eng in enumerate(engines):
            a = time.perf_counter()
            eng.velocity(*feeds[i])
            per[i].append(time.perf_counter() - a)
    return [statistics.median(p) for p in per]


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
    ap.add_argument("--repeats", type=int, default=5, help="timed guided steps per configuration")
    ap.add_argument("--time-group", type=int, default=64,
                    help="the group size whose configurations are timed (all kept resident)")
    ap.add_argument("--no-audio", action="store_true", help="latents only (skip the decoders)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from lofi.params import GenerateParams
    from lofi_mlx.bench import machine
    ckpt = checkpoint(args.model)
    frames = 26 if args.model == "goldens" else int(args.seconds * 44100 / 4096)
    params = GenerateParams("lofi hip hop, jazzy piano, vinyl crackle", max(5.0, args.seconds),
                            infer_steps=args.steps, seed=1234).validate()
    if args.engine == "onnx":  # ONNX Runtime: int8 per channel only
        configs = [(None, None)] + [(8, None) for b in args.bits if b == 8]
    else:
        configs = [(None, None)] + [(b, g) for b in args.bits for g in args.group_sizes]
    rows, lats, timed = [], [], []
    for bits, g in configs:
        keep = g in (None, args.time_group)
        row, lat, eng = one(args.engine, ckpt, bits, g, params, frames, keep)
        rows.append(row)
        lats.append(lat)
        if eng is not None:
            timed.append((row, eng))
        print(json.dumps(row), flush=True)
    secs = step_times([e for _, e in timed], ckpt, frames, args.repeats)
    for (row, eng), s in zip(timed, secs):
        row["guided_step_sec"] = round(s, 4)
        eng.release()
    del timed
    ref_lat = lats[0]
    for row, lat in zip(rows, lats):
        row["latents_rel_l2"] = rel_l2(lat, ref_lat)
    if not args.no_audio:
        # decoded: the unquantized run and the timed group size (the decoders cost the most)
        dec = make_engine(args.engine, ckpt, None, None)
        ref_mel = ref_wave = None
        for (bits, g), row, lat in zip(configs, rows, lats):
            if g not in (None, args.time_group):
                continue
            mel = dec.dcae_decode(lat)
            wave = dec.vocode(mel)[0]
            if ref_mel is None:
                ref_mel, ref_wave = mel, wave
            row["mel_rel_l2"] = rel_l2(mel, ref_mel)
            row["wave_rel_l2"] = rel_l2(wave, ref_wave)
            print(json.dumps(row), flush=True)
    res = {"machine": machine() + " (2-core x86-64 shared with other agents: figures noisy)",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
           "engine": args.engine, "frames": frames, "steps": args.steps,
           "command": "python benchmarks/quant_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    print(f"\n{'bits':>5} {'group':>6} {'DiT weights MiB':>16} {'s/guided step':>14} {'latents rel L2':>15} "
          f"{'mel rel L2':>11} {'wave rel L2':>12}")
    for r in rows:
        print(f"{str(r['bits'] or '-'):>5} {str(r['group_size'] or '-'):>6} {r['dit_weight_bytes'] / 2**20:>16.1f} "
              f"{r.get('guided_step_sec', float('nan')):>14.3f} {r['latents_rel_l2']:>15.2e} "
              f"{r.get('mel_rel_l2', float('nan')):>11.2e} {r.get('wave_rel_l2', float('nan')):>12.2e}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

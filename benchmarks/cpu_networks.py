"""Time each full-size MLX network on the CPU at a given audio length (random weights, fp32).

    python benchmarks/cpu_networks.py [--net dit|dcae|vocoder|all] [--seconds 10]
        [--dit-layers 4] [--threads 2] [--reps 3]

The DiT is timed as one guided step (batch 2: conditional and unconditional rows stacked) over
`--dit-layers` transformer blocks, scaled to the configured 24 (plus the per-step input/output
layers, timed once); the full fp32 DiT (~13 GB) need not fit. The DCAE decodes one latent
`[1, 8, 16, T]` to the mel `[1, 2, 128, 8T]`; the vocoder renders both stereo channels
`[2, 128, 8T]`. Each figure is the minimum of `--reps` runs after one warm-up (other processes
share this machine). Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import time


def _best(fn, reps: int) -> float:
    from lofi_mlx.mlxrt import mx
    mx.eval(fn())  # warm-up: buffer cache, JIT-compiled kernels
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _build(component: str, overrides: dict | None = None):
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig
    from lofi_mlx.acestep.native import construct
    from lofi_mlx.synthetic import _randomise
    from lofi_mlx.synthetic import configs
    cfgs, lyric = configs("full")
    cfg = dict(cfgs[component], **(overrides or {}))
    model = construct(component, cfg, lyric=LyricEncoderConfig(**lyric))
    _randomise(model, mx.float32)
    model.eval()
    return model, cfg


def frames(seconds: float) -> int:
    """Latent frames for a clip (44.1 kHz, hop 512, 8 mel frames per latent frame)."""
    return int(round(seconds * 44100 / 512 / 8))


def time_dit(seconds: float, layers: int, reps: int) -> dict:
    from lofi_mlx.mlxrt import mx
    model, cfg = _build("transformer", {"num_layers": layers})
    T, B, D = frames(seconds), 2, model.config.width
    mx.random.seed(1)
    x = mx.random.normal((B, 8, 16, T))
    t = mx.array([500.0, 500.0])
    ctx = mx.random.normal((B, 1 + 64 + 128, D)) * 0.1  # speaker + prompt tokens + lyric tokens
    mask = mx.ones(ctx.shape[:2])
    kv = model.cross_kv(ctx)  # cached per condition by the sampler
    mx.eval(x, t, ctx, mask, kv)
    whole = _best(lambda: model.decode(x, t, ctx, mask, cross_kv=kv), reps)
    # blocks alone, to separate the per-layer cost from the step's fixed part
    h = mx.random.normal((B, T, D))
    temb6 = mx.random.normal((B, 6, D)) * 0.1
    rope = model._rope(T)
    keep = mask == 1
    blk = model.transformer_blocks[0]
    per_layer = _best(lambda: blk(h, temb6, rope, kv[0], keep[:, None, None, :], None), reps)
    fixed = max(0.0, whole - layers * per_layer)
    return {"T": T, "per_layer_s": per_layer, "timed_layers": layers, "timed_s": whole,
            "step_s_24_layers": fixed + 24 * per_layer}


def time_dcae(seconds: float, reps: int) -> dict:
    from lofi_mlx.mlxrt import mx
    model, _ = _build("dcae")
    T = frames(seconds)
    z = mx.random.normal((1, 8, 16, T))
    mx.eval(z)
    return {"T": T, "decode_s": _best(lambda: model.decode_latents(z), reps)}


def time_vocoder(seconds: float, reps: int) -> dict:
    from lofi_mlx.mlxrt import mx
    model, _ = _build("vocoder")
    F = frames(seconds) * 8
    mel = mx.random.normal((2, 128, F)) - 5.0
    mx.eval(mel)
    return {"mel_frames": F, "vocode_s": _best(lambda: model.decode(mel), reps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=("dit", "dcae", "vocoder", "all"), default="all")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--dit-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(a.threads))
    from lofi_mlx.mlxrt import BLAS
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.mlxrt import set_threads
    set_threads(a.threads)
    mx.set_default_device(mx.cpu)
    print(f"BLAS={BLAS} threads={a.threads} seconds={a.seconds} loadavg={os.getloadavg()[0]:.2f}")
    nets = ("dit", "dcae", "vocoder") if a.net == "all" else (a.net,)
    for net in nets:
        if net == "dit":
            r = time_dit(a.seconds, a.dit_layers, a.reps)
        elif net == "dcae":
            r = time_dcae(a.seconds, a.reps)
        else:
            r = time_vocoder(a.seconds, a.reps)
        print(net, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              flush=True)
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

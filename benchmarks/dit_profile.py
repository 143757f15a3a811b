"""Where a CPU DiT step goes, and what cheap changes buy (MLX, fp32, mid-size widths).

    PYTHONPATH=. python benchmarks/dit_profile.py [--seconds 10] [--layers 3] [--ctx 22 300]
        [--reps 5] [--json OUT]

One guided step = one batch-2 velocity call. Part 1 splits a transformer block into its pieces,
each timed alone on the block's real inputs (evaluated before and after, so the sum is a little
above the fused block): the GEMMs (their GFLOP/s shown), RoPE + the linear-attention core, the
cross-attention core, the depthwise-conv GLU, norms and modulation. Part 2 times variants side by
side, taking turns each round (the machine is shared): the context's cross-attention K/V
recomputed every step (what the engine did) against cached once per condition; q/k/v as three
GEMMs against one GEMM on the concatenated weight. Random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _time(fn, reps):
    from lofi_mlx.mlxrt import mx
    mx.eval(fn())
    out = []
    for _ in range(reps):
        a = time.perf_counter()
        mx.eval(fn())
        out.append(time.perf_counter() - a)
    return statistics.median(out)


def build(layers: int):
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig
    from lofi_mlx.acestep.native import construct
    from lofi_mlx.synthetic import _randomise, configs
    cfgs, lyric = configs("mid")
    cfg = dict(cfgs["transformer"], num_layers=layers)
    model = construct("transformer", cfg, lyric=LyricEncoderConfig(**lyric))
    _randomise(model, mx.float32)
    model.eval()
    return model


def pieces(model, T: int, L: int, reps: int) -> dict:
    """Seconds per piece of one block, batch 2."""
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.mlxrt import nn
    from lofi_mlx.acestep import dit
    from lofi_mlx.acestep.common import rms_norm

    blk = model.transformer_blocks[0]
    B, D = 2, model.config.width
    H, d = blk.attn.heads, blk.attn.head_dim
    mx.random.seed(0)
    h = mx.random.normal((B, T, D))
    ctx = mx.random.normal((B, L, D)) * 0.1
    temb6 = mx.random.normal((B, 6, D)) * 0.1
    cos, sin = model._rope(T)
    cc, sc = model._rope(L)
    kv = blk.cross_attn.kv(ctx, cc, sc)
    keep = mx.ones((B, L)) == 1
    mx.eval(h, ctx, temb6, kv)
    F = blk.ff.point_conv.weight.shape[1]
    gemm = lambda m, k, n: 2 * m * k * n
    rows = B * T
    q = blk.attn.to_q(h).reshape(B, T, H, d)
    u = blk.ff.inverted_conv(h)
    mx.eval(q, u)
    out = {}

    def add(name, fn, flops=None):
        s = _time(fn, reps)
        out[name] = {"sec": s, "gflops": (flops / s / 1e9) if flops else None}

    add("norm + modulation (x2)", lambda: [rms_norm(h, 1e-6) * (1 + temb6[:, 1:2]) + temb6[:, 0:1]
                                           for _ in range(2)])
    add("self-attn q,k,v GEMMs", lambda: [blk.attn.to_q(h), blk.attn.to_k(h), blk.attn.to_v(h)],
        3 * gemm(rows, D, D))
    add("self-attn RoPE + linear-attention core", lambda: _linear_core(blk.attn, q, q, q, cos, sin))
    add("self-attn out GEMM", lambda: blk.attn.to_out[0](h), gemm(rows, D, D))
    add("cross-attn q GEMM", lambda: blk.cross_attn.to_q(h), gemm(rows, D, D))
    add("cross-attn RoPE + softmax core", lambda: _cross_core(blk.cross_attn, q, kv, keep, cos, sin))
    add("cross-attn out GEMM", lambda: blk.cross_attn.to_out[0](h), gemm(rows, D, D))
    add("cross-attn context K,V (per step if not cached)", lambda: blk.cross_attn.kv(ctx, cc, sc),
        2 * gemm(B * L, D, D))
    add("ff inverted GEMM (D -> 2F)", lambda: blk.ff.inverted_conv(h), gemm(rows, D, 2 * F))
    add("ff depthwise conv + GLU", lambda: dit.conv3_glu(u, blk.ff.depth_conv.weight, blk.ff.depth_conv.bias))
    add("ff point GEMM (F -> D)", lambda: blk.ff.point_conv(u[..., :F]), gemm(rows, F, D))
    add("whole block (fused graph)", lambda: blk(h, temb6, (cos, sin), kv, keep[:, None, None, :], None))
    return out


def _linear_core(attn, q, k, v, cos, sin):
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.mlxrt import nn
    from lofi_mlx.acestep.dit import apply_rope
    B, T, H, d = q.shape
    q = nn.relu(apply_rope(q, cos, sin)).transpose(0, 2, 1, 3)
    k = nn.relu(apply_rope(k, cos, sin)).transpose(0, 2, 1, 3)
    v = mx.concatenate([v.transpose(0, 2, 1, 3), mx.ones((B, H, T, 1))], axis=-1)
    o = q @ (k.transpose(0, 1, 3, 2) @ v)
    return o[..., :d] / (o[..., d:] + 1e-15)


def _cross_core(xattn, q, kv, keep, cos, sin):
    import math
    from lofi_mlx.acestep.dit import _masked_softmax_cpu, apply_rope
    k, v = kv
    d = q.shape[-1]
    qq = apply_rope(q, cos, sin).transpose(0, 2, 1, 3)
    w = _masked_softmax_cpu((qq * (1.0 / math.sqrt(d))) @ k.swapaxes(-1, -2), keep[:, None, None, :])
    return w @ v


def variants(model, T: int, L: int, reps: int) -> dict:
    """Side by side, in turns: (a) K/V of the context per step vs cached; (b) fused q/k/v GEMM."""
    from lofi_mlx.mlxrt import mx
    B, D = 2, model.config.width
    mx.random.seed(1)
    x = mx.random.normal((B, 8, 16, T))
    t = mx.array([500.0, 500.0])
    ctx = mx.random.normal((B, L, D)) * 0.1
    mask = mx.ones((B, L))
    erg = mx.array([False, True])
    kv = model.cross_kv(ctx)
    mx.eval(x, ctx, kv)
    blk = model.transformer_blocks[0]
    h = mx.random.normal((B, T, D))
    wqkv = mx.concatenate([blk.attn.to_q.weight, blk.attn.to_k.weight, blk.attn.to_v.weight])
    bqkv = mx.concatenate([blk.attn.to_q.bias, blk.attn.to_k.bias, blk.attn.to_v.bias])
    mx.eval(h, wqkv, bqkv)
    cands = {
        "step, context K/V recomputed": lambda: model.decode(x, t, ctx, mask, erg=erg),
        "step, context K/V cached": lambda: model.decode(x, t, ctx, mask, erg=erg, cross_kv=kv),
        "q,k,v: three GEMMs": lambda: [blk.attn.to_q(h), blk.attn.to_k(h), blk.attn.to_v(h)],
        "q,k,v: one GEMM (concatenated weight)": lambda: mx.split(mx.addmm(bqkv, h, wqkv.T), 3, axis=-1),
    }
    for fn in cands.values():
        mx.eval(fn())
    times = {k: [] for k in cands}
    for _ in range(reps):
        for k, fn in cands.items():
            a = time.perf_counter()
            mx.eval(fn())
            times[k].append(time.perf_counter() - a)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--ctx", type=int, nargs="+", default=[22, 300],
                    help="context lengths: 1 + prompt tokens + lyric tokens (22: an instrumental)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from lofi_mlx.mlxrt import BLAS, mx
    from lofi_mlx.bench import machine
    mx.set_default_device(mx.cpu)
    model = build(args.layers)
    mx.eval(model.parameters())
    T = int(args.seconds * 44100 / 4096)
    res = {"machine": machine() + " (2-core x86-64 shared with other agents: figures noisy)", "blas": BLAS,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "frames": T, "layers": args.layers,
           "command": "python benchmarks/dit_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "pieces": pieces(model, T, args.ctx[0], args.reps), "variants": {}}
    for L in args.ctx:
        res["variants"][str(L)] = variants(model, T, L, args.reps)
    print(f"one block, batch 2, T = {T}, context {args.ctx[0]} ({res['blas']}):")
    for k, v in res["pieces"].items():
        g = f"{v['gflops']:7.1f} GFLOP/s" if v["gflops"] else ""
        print(f"  {k:<50}{v['sec'] * 1e3:9.2f} ms {g}")
    for L, vs in res["variants"].items():
        print(f"side by side, context length {L}, {args.layers} layers (median of {args.reps}, in turns):")
        for k, v in vs.items():
            print(f"  {k:<50}{v['median'] * 1e3:9.2f} ms  (min {v['min'] * 1e3:.2f}, max {v['max'] * 1e3:.2f})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ACE-Step v1 diffusion transformer (ACEStepTransformer2DModel), spec §4.

`encode` builds the cross-attention context once per condition; `decode` is one velocity
evaluation. Activations are channels-last `[B, T, D]`; the latent keeps the reference layout
`[B, 8, 16, T]` at the interface.

The reference's `attention_mask` input (latent frames) is always all ones because sequences are
never padded, so it is not an argument here: with ones it multiplies by 1 in self-attention and
masks nothing in cross-attention.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial, wraps
from pathlib import Path

import numpy as np

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import DIT_CLIP as CLIP
from lofi.acestep.configs import DIT_ERG_BLOCKS as ERG_BLOCKS
from lofi.acestep.configs import DIT_ERG_SCALE as ERG_SCALE
from lofi.acestep.configs import DIT_GROUPS as GROUPS
from lofi.acestep.configs import DIT_UNUSED_PARTS as UNUSED_PARTS
from lofi.acestep.configs import DIT_UNUSED_PREFIXES as UNUSED_PREFIXES
from lofi.acestep.configs import DiTConfig
from lofi.errors import INVALID_PARAMS, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn
from lofi.acestep.tables import TIME_CHANNELS, time_frequencies
from lofi.acestep.tables import rope_tables as numpy_rope_tables
from lofi.acestep.tiling import windows
from lofi_mlx.acestep.common import DTYPES
from lofi_mlx.acestep.common import drop_keys
from lofi_mlx.acestep.common import exp_f32
from lofi_mlx.acestep.common import fused
from lofi_mlx.acestep.common import load_strict
from lofi_mlx.acestep.common import rms_norm
from lofi_mlx.acestep.common import silu_f32
from lofi_mlx.acestep.lyric_encoder import LyricEncoder
from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig


# In fp16 runs the residual stream stays fp32, which carries the 12,800-wide GLU feed-forward,
# the residual adds and the final layer in fp32 too: their activations can pass fp16's 65,504
# (bf16 has fp32's range and needs none of this). False only to measure what they prevent.
FP16_ISLANDS = True

# Latent frames per feed-forward chunk (see GLUMBConv), ~47 s of audio: bounds a step's
# temporaries at any length; each chunk's GEMMs still have >= 1024 rows.
FF_CHUNK = 512


# ---------------------------------------------------------------------------------------------
# fp32 tables

@lru_cache(maxsize=16)
def rope_tables(n: int, head_dim: int, theta: float, dtype_name: str = "fp32"):
    """cos/sin `[n, head_dim]` for positions 0..n-1 (`lofi.acestep.tables.rope_tables`), built in fp32
    like the reference buffers, rounded to the run dtype (the reference casts its buffers with the
    model) and kept in fp32 for the rotation arithmetic."""
    dt = DTYPES[dtype_name]
    return tuple(mx.array(t).astype(dt).astype(mx.float32)
                 for t in numpy_rope_tables(n, head_dim, theta))


@lru_cache(maxsize=1)
def _time_freqs(channels: int = TIME_CHANNELS):
    return mx.array(time_frequencies(channels))


def timestep_sinusoid(t) -> mx.array:
    """[B] -> [B, 256] fp32: cos first (flip_sin_to_cos), t used as given (0..1000), no shift."""
    a = t.astype(mx.float32)[:, None] * _time_freqs()[None]
    return mx.concatenate([mx.cos(a), mx.sin(a)], axis=-1)


def gpu_compiled(fn):
    """mx.compile (fused elementwise kernels) on the GPU; plain ops on the CPU, where the op is
    already cheap (RoPE: <1 ms per layer) and the JIT's first build (a C++ compile) not worth it."""
    compiled = mx.compile(fn)

    @wraps(fn)
    def call(*args):
        return (compiled if mx.default_device().type == mx.DeviceType.gpu else fn)(*args)

    call.compiled = compiled
    return call


@gpu_compiled
def apply_rope(x, cos, sin):
    """x [B, N, H, d]; cos/sin [N, d]. Pairs (2i, 2i+1) rotate, each element at its own frequency."""
    xf = x.astype(mx.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rot = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


def _scale_rows(q, q_scale):
    """ERG: multiply each batch row's q by its scale ([B,1,1] fp32) in fp32, back to the run dtype."""
    return q if q_scale is None else (q.astype(mx.float32) * q_scale).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# modules

class PatchEmbed(nn.Module):
    """Conv(16x1 stride 16x1) -> GroupNorm(32) -> Conv 1x1, as two matmuls around a GroupNorm."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        hid = cfg.patch_hidden
        self.early_conv_layers = [
            nn.Linear(cfg.in_channels * cfg.patch_height, hid),
            nn.GroupNorm(GROUPS, hid, eps=cfg.norm_eps, pytorch_compatible=True),
            nn.Linear(hid, cfg.width),
        ]

    def __call__(self, x):
        B, C, R, T = x.shape
        conv0, norm, conv2 = self.early_conv_layers
        y = conv0(x.transpose(0, 3, 1, 2).reshape(B, T, C * R))           # per frame, order c*16+r
        # statistics over (channels of the group) x (ALL frames): every frame sees the whole clip
        yf = y.astype(mx.float32).reshape(B, T, GROUPS, -1)
        mu = mx.mean(yf, axis=(1, 3), keepdims=True)
        var = mx.mean(mx.square(yf - mu), axis=(1, 3), keepdims=True)
        y = ((yf - mu) * mx.rsqrt(var + self.eps)).reshape(B, T, -1).astype(y.dtype)
        return conv2(y * norm.weight + norm.bias)


class TimestepEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_CHANNELS, cfg.width)
        self.linear_2 = nn.Linear(cfg.width, cfg.width)

    def __call__(self, e):
        return self.linear_2(nn.silu(self.linear_1(e)))


class LinearAttention(nn.Module):
    """ReLU linear self-attention with RoPE; sums in fp32, O(T d^2) per head."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.width
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = nn.Linear(D, D)
        self.to_k = nn.Linear(D, D)
        self.to_v = nn.Linear(D, D)
        self.to_out = [nn.Linear(D, D)]

    def __call__(self, x, cos, sin, q_scale=None):
        B, T, D = x.shape
        H, d = self.heads, self.head_dim
        q = apply_rope(_scale_rows(self.to_q(x), q_scale).reshape(B, T, H, d), cos, sin)
        k = apply_rope(self.to_k(x).reshape(B, T, H, d), cos, sin)
        v = self.to_v(x).reshape(B, T, H, d)
        q = nn.relu(q).astype(mx.float32).transpose(0, 2, 1, 3)
        k = nn.relu(k).astype(mx.float32).transpose(0, 2, 1, 3)
        v = v.astype(mx.float32).transpose(0, 2, 1, 3)
        # a ones column on V makes the same product carry the normaliser sum_s K_s.Q_t
        v = mx.concatenate([v, mx.ones((B, H, T, 1), mx.float32)], axis=-1)
        o = q @ (k.transpose(0, 1, 3, 2) @ v)                               # [B, H, T, d+1]
        o = o[..., :d] / (o[..., d:] + 1e-15)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, D).astype(x.dtype)
        return mx.clip(self.to_out[0](o), -CLIP, CLIP)


@fused
def _masked_softmax_cpu(s, keep):
    """Softmax over keys where `keep`, fp32, with the polynomial exp: MLX's CPU SDPA is plain ops
    whose scalar exp made it ~2x slower (measured). A row with no key gives NaN (as the
    reference); the caller replaces it."""
    s = mx.where(keep, s.astype(mx.float32), -mx.inf)
    e = mx.where(keep, exp_f32(s - mx.max(s, axis=-1, keepdims=True)), 0.0)
    return e / mx.sum(e, axis=-1, keepdims=True)


class CrossAttention(nn.Module):
    """Softmax attention from latent frames to the context, RoPE on q (frames) and k (context)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.width
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = nn.Linear(D, D)
        self.to_k = nn.Linear(D, D)
        self.to_v = nn.Linear(D, D)
        self.to_out = [nn.Linear(D, D)]

    def kv(self, ctx, cos, sin):
        B, L, _ = ctx.shape
        H, d = self.heads, self.head_dim
        k = apply_rope(self.to_k(ctx).reshape(B, L, H, d), cos, sin).transpose(0, 2, 1, 3)
        v = self.to_v(ctx).reshape(B, L, H, d).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x, kv, key_mask, has_key, cos, sin, q_scale=None):
        B, T, D = x.shape
        H, d = self.heads, self.head_dim
        q = apply_rope(_scale_rows(self.to_q(x), q_scale).reshape(B, T, H, d), cos, sin)
        k, v = kv
        if q.dtype != k.dtype:  # fp16 islands: q from the fp32 stream may pass fp16's range
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        q = q.transpose(0, 2, 1, 3)
        if mx.default_device().type == mx.DeviceType.cpu:
            w = _masked_softmax_cpu((q * (1.0 / math.sqrt(d))) @ k.swapaxes(-1, -2), key_mask)
            o = (w.astype(v.dtype) @ v)
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d), mask=key_mask)
        if has_key is not None:  # a row with every key masked is NaN in the reference; give 0
            o = mx.where(has_key, o, 0.0)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, T, D))


def _conv3_glu(u, w, b, act=nn.silu):
    """act, depthwise Conv1d k=3 (zero padding) along time as three shifted multiply-adds
    (tap k multiplies u[t-1+k]), then value * act(gate) over the two channel halves."""
    u = act(u)
    p = mx.pad(u, [(0, 0), (1, 1), (0, 0)])
    y = p[:, :-2] * w[0] + p[:, 1:-1] * w[1] + p[:, 2:] * w[2] + b
    a, g = mx.split(y, 2, axis=-1)
    return a * act(g)


# One fused kernel on either device; on the CPU with the polynomial SiLU, since MLX's exp is a
# scalar call per element there (this op was ~15% of a DiT layer on the CPU before).
_conv3_glu_gpu = fused(_conv3_glu)
_conv3_glu_cpu = fused(partial(_conv3_glu, act=silu_f32))


@wraps(_conv3_glu)
def conv3_glu(u, w, b):
    """SiLU -> depthwise conv k=3 -> GLU with SiLU gate, `[B, T, 2F] -> [B, T, F]`."""
    return (_conv3_glu_cpu if mx.default_device().type == mx.DeviceType.cpu else _conv3_glu_gpu)(u, w, b)


conv3_glu.compiled = _conv3_glu_cpu


class DepthwiseConv3(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = mx.zeros((3, channels))  # [C, 1, 3] in the checkpoint
        self.bias = mx.zeros((channels,))


class GLUMBConv(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        F = cfg.ffn_hidden
        self.inverted_conv = nn.Linear(cfg.width, 2 * F)
        self.depth_conv = DepthwiseConv3(2 * F)
        self.point_conv = nn.Linear(F, cfg.width, bias=False)

    def _run(self, x):
        return conv3_glu(self.inverted_conv(x), self.depth_conv.weight, self.depth_conv.bias)

    def __call__(self, x):
        # The [B, T, 2F] activations dominate a long step's temporaries: long inputs go in time
        # chunks (with the one frame of context the k=3 conv reads on either side), each one
        # evaluated before the next, or the lazy graph runs them side by side. At 240 s, 2 rows:
        # 3.1 -> 1.0 GiB of temporaries per block, same time (benchmarks/RESULTS.md).
        wins = windows(x.shape[1], FF_CHUNK, 1)
        if len(wins) == 1:
            return self.point_conv(self._run(x))
        outs = []
        for w in wins:
            outs.append(self.point_conv(self._run(x[:, w.a:w.b])[:, w.s - w.a:w.e - w.a]))
            mx.eval(outs[-1])
        return mx.concatenate(outs, axis=1)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.scale_shift_table = mx.zeros((6, cfg.width))
        self.attn = LinearAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.ff = GLUMBConv(cfg)

    def __call__(self, h, temb6, rope, kv, key_mask, has_key, q_scale=None):
        """h: the residual stream, in the run dtype, or fp32 in an fp16 run (see FP16_ISLANDS):
        then the feed-forward and the residual adds compute in fp32 by promotion (fp16 weights
        times an fp32 stream), and only the normalised self-attention input narrows to fp16."""
        cos, sin = rope
        mod = self.scale_shift_table[None] + temb6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mx.split(mod, 6, axis=1)
        n = (rms_norm(h, self.eps) * (1 + scale_msa) + shift_msa).astype(mod.dtype)
        h = h + gate_msa * self.attn(n, cos, sin, q_scale)
        h = h + self.cross_attn(h, kv, key_mask, has_key, cos, sin, q_scale)  # raw stream, no gate
        n = rms_norm(h, self.eps) * (1 + scale_mlp) + shift_mlp
        return h + gate_mlp * self.ff(n)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.scale_shift_table = mx.zeros((2, cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch_height * cfg.out_channels)

    def __call__(self, h, emb):
        shift, scale = mx.split(self.scale_shift_table[None] + emb[:, None], 2, axis=1)
        return self.linear(rms_norm(h, self.eps) * (1 + scale) + shift)


def _as_mx(x, dtype=None):
    if not isinstance(x, mx.array):
        x = np.asarray(x)
        x = mx.array(x.astype(np.float32) if x.dtype == np.float64 else x)  # no float64 on GPU
    return x if dtype is None else x.astype(dtype)


class ACEStepDiT(nn.Module):
    def __init__(self, config: DiTConfig, lyric_config: LyricEncoderConfig | None = None):
        super().__init__()
        cfg = self.config = config
        lyric_config = lyric_config or LyricEncoderConfig(input_size=cfg.lyric_hidden)
        D = cfg.width
        self.proj_in = PatchEmbed(cfg)
        self.timestep_embedder = TimestepEmbedding(cfg)
        self.t_block = nn.Linear(D, 6 * D)
        self.speaker_embedder = nn.Linear(cfg.speaker_dim, D)
        self.genre_embedder = nn.Linear(cfg.text_dim, D)
        self.lyric_embs = nn.Embedding(cfg.lyric_vocab, cfg.lyric_hidden)
        self.lyric_encoder = LyricEncoder(lyric_config)
        self.lyric_proj = nn.Linear(lyric_config.width, D)
        self.transformer_blocks = [DiTBlock(cfg) for _ in range(cfg.num_layers)]
        self.final_layer = FinalLayer(cfg)

    @property
    def dtype(self):
        return self.t_block.weight.dtype

    def _rope(self, n: int):
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        return rope_tables(n, self.config.head_dim, self.config.rope_theta, name)

    # -- context -------------------------------------------------------------------------------

    def encode(self, text_hidden, text_mask, lyric_ids, lyric_mask, erg_lyric: bool = False,
               trace: dict | None = None):
        """-> (ctx [B, 1+Nt+Nl, D] run dtype, ctx_mask [B, 1+Nt+Nl] fp32).

        text_hidden [B, Nt, text_dim]; text_mask [B, Nt]; lyric_ids [B, Nl] int; lyric_mask
        [B, Nl]. erg_lyric scales linear_q of Conformer blocks 4-5 by 0.01 (the "null" lyrics).
        trace: when given, filled with speaker_embedder, genre_embedder, lyric_embs,
        lyric_encoder.embed, lyric_encoder, lyric_proj.
        """
        dt = self.dtype
        text_hidden = _as_mx(text_hidden, dt)
        B = text_hidden.shape[0]
        lyric_mask = _as_mx(lyric_mask)
        # v1 always passes a zero speaker vector, so its projection is exactly the bias
        spk = mx.broadcast_to(self.speaker_embedder.bias, (B, self.config.width))
        txt = self.genre_embedder(text_hidden)
        lyr = self.lyric_embs(_as_mx(lyric_ids, mx.int32))
        if trace is not None:
            trace.update({"speaker_embedder": spk, "genre_embedder": txt, "lyric_embs": lyr})
        lyr = self.lyric_proj(self.lyric_encoder(lyr, lyric_mask, erg=erg_lyric, trace=trace))
        if trace is not None:
            trace["lyric_proj"] = lyr
        ctx = mx.concatenate([spk[:, None], txt, lyr], axis=1)
        ctx_mask = mx.concatenate([mx.ones((B, 1), mx.float32), _as_mx(text_mask, mx.float32),
                                   lyric_mask.astype(mx.float32)], axis=1)
        return ctx, ctx_mask

    def cross_kv(self, ctx):
        """Per-block cross-attention (k after RoPE, v); constant over a sampling run, so cacheable."""
        ctx = _as_mx(ctx, self.dtype)
        cos, sin = self._rope(ctx.shape[1])
        return [blk.cross_attn.kv(ctx, cos, sin) for blk in self.transformer_blocks]

    # -- one velocity evaluation ---------------------------------------------------------------

    def decode(self, x, timestep, ctx, ctx_mask, erg=None, trace: dict | None = None,
               cross_kv=None):
        """x [B, 8, 16, T], timestep [B] (t = 1000 sigma) -> velocity [B, 8, 16, T] (run dtype).

        erg: [B] bool (or one bool for all rows) or None; a True row gets the 0.01 scaling of
        self- and cross-attention q in blocks 15..19, so a conditional and an ERG-null row can
        share one batch. cross_kv: the result of `cross_kv(ctx)`, to skip recomputing it each step.
        trace: when given, filled with time_proj, timestep_embedder, t_block, proj_in, block.{i},
        final_layer.
        """
        cfg, dt = self.config, self.dtype
        x = _as_mx(x, dt)
        B, _, _, T = x.shape
        t = mx.broadcast_to(_as_mx(timestep, mx.float32).reshape(-1), (B,))
        e = timestep_sinusoid(t)
        emb = self.timestep_embedder(e.astype(dt))
        temb = self.t_block(nn.silu(emb))
        h = self.proj_in(x)
        if dt == mx.float16 and FP16_ISLANDS:
            h = h.astype(mx.float32)  # the residual stream, feed-forward and final layer in fp32
        if trace is not None:
            trace.update({"time_proj": e, "timestep_embedder": emb, "t_block": temb, "proj_in": h})

        # only an exact 1 lets a key through, as in the reference's where(mask == 1, 0, -inf)
        keep = _as_mx(ctx_mask) == 1
        key_mask = keep[:, None, None, :]
        has_key = mx.any(keep, axis=1)
        has_key = None if mx.all(has_key).item() else has_key[:, None, None, None]
        if cross_kv is None:
            cross_kv = self.cross_kv(ctx)
        q_scale = None
        if erg is not None:
            q_scale = mx.where(_as_mx(erg, mx.bool_), ERG_SCALE, 1.0).astype(mx.float32)
            q_scale = mx.broadcast_to(q_scale.reshape(-1), (B,))[:, None, None]
        rope = self._rope(T)
        temb6 = temb.reshape(B, 6, cfg.width)
        for i, blk in enumerate(self.transformer_blocks):
            h = blk(h, temb6, rope, cross_kv[i], key_mask, has_key,
                    q_scale if i in ERG_BLOCKS else None)
            if trace is not None:
                trace[f"block.{i}"] = h
        y = self.final_layer(h, emb)                                        # [B, T, 16*8]
        v = y.reshape(B, T, cfg.patch_height, cfg.out_channels).transpose(0, 3, 2, 1)
        if trace is not None:
            trace["final_layer"] = v
        return v

    def __call__(self, x, timestep, text_hidden, text_mask, lyric_ids, lyric_mask):
        ctx, ctx_mask = self.encode(text_hidden, text_mask, lyric_ids, lyric_mask)
        return self.decode(x, timestep, ctx, ctx_mask)

    # -- weights -------------------------------------------------------------------------------

    def sanitize(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for k, v in drop_keys(weights, UNUSED_PREFIXES, UNUSED_PARTS).items():
            if k in ("proj_in.early_conv_layers.0.weight", "proj_in.early_conv_layers.2.weight"):
                v = v.reshape(v.shape[0], -1)                              # conv -> matmul weight
            elif k.startswith("t_block.1."):
                k = "t_block." + k[len("t_block.1."):]                    # index 0 is the SiLU
            elif ".ff.inverted_conv.conv." in k or ".ff.point_conv.conv." in k:
                k = k.replace(".conv.", ".", 1)
                if k.endswith(".weight"):
                    v = v.reshape(v.shape[0], -1)                          # [O, I, 1] -> [O, I]
            elif ".ff.depth_conv.conv." in k:
                k = k.replace(".conv.", ".", 1)
                if k.endswith(".weight"):
                    v = v.reshape(v.shape[0], -1).T                        # [C, 1, 3] -> [3, C]
            out[k] = v
        return out


def load(checkpoint_root: str | Path, precision: str = "fp32") -> ACEStepDiT:
    if precision not in DTYPES:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    cfg, raw = load_component(checkpoint_root, "transformer")
    model = ACEStepDiT(DiTConfig.from_dict(cfg), LyricEncoderConfig.from_weights(raw))
    source = str(component_dir(checkpoint_root, "transformer"))
    return load_strict(model, model.sanitize(raw), DTYPES[precision], source)

"""The Conformer lyric encoder of ACE-Step v1 (spec §3.3-3.4).

Six pre-norm blocks of Transformer-XL relative-position attention and a SiLU feed-forward; no
macaron FFN and no convolution module. Its sizes are hard-coded in the reference (not in
config.json), so `LyricEncoderConfig.from_weights` reads them from the weight shapes.
"""

from __future__ import annotations

import math

import numpy as np

from lofi.acestep.configs import LYRIC_ERG_LAYERS as ERG_LAYERS
from lofi.acestep.configs import LYRIC_ERG_SCALE as ERG_SCALE
from lofi.acestep.configs import LYRIC_PREFIX as PREFIX  # noqa: F401  (old name)
from lofi.acestep.configs import LyricEncoderConfig
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn
from lofi.acestep.tables import relative_positions
from lofi_mlx.acestep.common import layer_norm


class RelPositionAttention(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        w = cfg.width
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.linear_q = nn.Linear(w, w)
        self.linear_k = nn.Linear(w, w)
        self.linear_v = nn.Linear(w, w)
        self.linear_out = nn.Linear(w, w)
        self.linear_pos = nn.Linear(w, w, bias=False)
        self.pos_bias_u = mx.zeros((cfg.heads, cfg.head_dim))
        self.pos_bias_v = mx.zeros((cfg.heads, cfg.head_dim))

    def __call__(self, x, pe, rel_index, key_mask, q_scale: float = 1.0):
        B, N, _ = x.shape
        H, d = self.heads, self.head_dim
        q = self.linear_q(x)
        if q_scale != 1.0:
            q = (q.astype(mx.float32) * q_scale).astype(x.dtype)
        q = q.reshape(B, N, H, d)
        k = self.linear_k(x).reshape(B, N, H, d).transpose(0, 2, 1, 3)
        v = self.linear_v(x).reshape(B, N, H, d).transpose(0, 2, 1, 3)
        p = self.linear_pos(pe).reshape(-1, H, d).transpose(1, 0, 2)        # [H, 2N-1, d]
        qu = (q + self.pos_bias_u).transpose(0, 2, 1, 3)
        qv = (q + self.pos_bias_v).transpose(0, 2, 1, 3)
        ac = qu @ k.transpose(0, 1, 3, 2)                                  # [B, H, N, N]
        bd_all = qv @ p.transpose(0, 2, 1)                                 # [B, H, N, 2N-1]
        # Transformer-XL rel-shift as a gather: column (N-1)-(i-j) holds relative position i-j
        bd = mx.take_along_axis(bd_all, mx.broadcast_to(rel_index, (B, H, N, N)), axis=-1)
        s = (ac + bd).astype(mx.float32) / math.sqrt(d)
        keep = key_mask[:, None, None, :]
        s = mx.where(keep, s, -mx.inf)
        # all-masked rows (empty lyrics) give NaN in softmax; the reference overwrites them with 0
        attn = mx.where(keep, mx.softmax(s, axis=-1), 0.0).astype(v.dtype)
        o = (attn @ v).transpose(0, 2, 1, 3).reshape(B, N, H * d)
        return self.linear_out(o)


class FeedForward(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.w_1 = nn.Linear(cfg.width, cfg.ff)
        self.w_2 = nn.Linear(cfg.ff, cfg.width)

    def __call__(self, x):
        return self.w_2(nn.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = RelPositionAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm_mha = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.norm_ff = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def __call__(self, x, pe, rel_index, key_mask, q_scale: float = 1.0):
        a = layer_norm(x, self.norm_mha.weight, self.norm_mha.bias, self.eps)
        x = x + self.self_attn(a, pe, rel_index, key_mask, q_scale)
        f = layer_norm(x, self.norm_ff.weight, self.norm_ff.bias, self.eps)
        return x + self.feed_forward(f)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm; `out.0` / `out.1` follow the checkpoint's Sequential indices."""

    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.eps = cfg.eps
        self.out = [nn.Linear(cfg.input_size, cfg.width), nn.LayerNorm(cfg.width, eps=cfg.eps)]

    def __call__(self, x):
        lin, norm = self.out
        return layer_norm(lin(x), norm.weight, norm.bias, self.eps)


class LyricEncoder(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = LinearEmbed(cfg)
        self.encoders = [ConformerLayer(cfg) for _ in range(cfg.blocks)]
        self.after_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def __call__(self, x, mask, erg: bool = False, trace: dict | None = None):
        """x: token embeddings [B, N, input_size]; mask: [B, N] (nonzero = real token) -> [B, N, width]."""
        cfg = self.config
        N = x.shape[1]
        x = self.embed(x) * math.sqrt(cfg.width)
        if trace is not None:
            trace["lyric_encoder.embed"] = x
        pe = mx.array(relative_positions(N, cfg.width)).astype(x.dtype)
        i = np.arange(N)
        rel_index = mx.array((N - 1) - (i[:, None] - i[None, :]), dtype=mx.int32)
        key_mask = mask.astype(mx.bool_)
        for n, layer in enumerate(self.encoders):
            scale = ERG_SCALE if erg and n in ERG_LAYERS else 1.0
            x = layer(x, pe, rel_index, key_mask, scale)
        x = layer_norm(x, self.after_norm.weight, self.after_norm.bias, cfg.eps)
        if trace is not None:
            trace["lyric_encoder"] = x
        return x

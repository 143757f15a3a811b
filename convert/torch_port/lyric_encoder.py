"""The Conformer lyric encoder of ACE-Step v1 in PyTorch (spec §3.3-3.4).

Six pre-norm blocks of Transformer-XL relative-position attention and a SiLU feed-forward.
Sizes are hard-coded in the reference, so `LyricEncoderConfig.from_weights` reads them from
the weight shapes. The relative-position table `pe` and the rel-shift gather index are graph
inputs (`lofi_cuda.tables.relative_positions` / `relative_index`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lofi.acestep.configs import LYRIC_ERG_LAYERS as ERG_LAYERS
from lofi.acestep.configs import LYRIC_ERG_SCALE as ERG_SCALE
from lofi.acestep.configs import LYRIC_PREFIX as PREFIX  # noqa: F401  (old name)
from lofi.acestep.configs import LyricEncoderConfig

from convert.torch_port.common import layer_norm

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
        self.pos_bias_u = nn.Parameter(torch.zeros(cfg.heads, cfg.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(cfg.heads, cfg.head_dim))

    def forward(self, x, pe, rel_index, keep, q_scale):
        B, N, _ = x.shape
        H, d = self.heads, self.head_dim
        q = (self.linear_q(x).float() * q_scale).to(x.dtype).reshape(B, N, H, d)
        k = self.linear_k(x).reshape(B, N, H, d).transpose(1, 2)
        v = self.linear_v(x).reshape(B, N, H, d).transpose(1, 2)
        p = self.linear_pos(pe).reshape(-1, H, d).transpose(0, 1)          # [H, 2N-1, d]
        qu = (q + self.pos_bias_u).transpose(1, 2)
        qv = (q + self.pos_bias_v).transpose(1, 2)
        ac = qu.float() @ k.float().transpose(-1, -2)                      # [B, H, N, N]
        bd_all = qv.float() @ p.float().transpose(-1, -2)                  # [B, H, N, 2N-1]
        # Transformer-XL rel-shift as a gather: column (N-1)-(i-j) holds relative position i-j
        bd = torch.gather(bd_all, -1, rel_index.expand(B, H, N, N))
        s = (ac + bd) / math.sqrt(d)
        keep = keep[:, None, None, :]
        s = torch.where(keep, s, torch.tensor(float("-inf")))
        # all-masked rows (empty lyrics) are NaN after softmax; the reference sets them to 0
        attn = torch.where(keep, torch.softmax(s, dim=-1), torch.tensor(0.0)).to(v.dtype)
        return self.linear_out((attn @ v).transpose(1, 2).reshape(B, N, H * d))


class FeedForward(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.w_1 = nn.Linear(cfg.width, cfg.ff)
        self.w_2 = nn.Linear(cfg.ff, cfg.width)

    def forward(self, x):
        return self.w_2(torch.nn.functional.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = RelPositionAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm_mha = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.norm_ff = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x, pe, rel_index, keep, q_scale):
        a = layer_norm(x, self.norm_mha.weight, self.norm_mha.bias, self.eps)
        x = x + self.self_attn(a, pe, rel_index, keep, q_scale)
        f = layer_norm(x, self.norm_ff.weight, self.norm_ff.bias, self.eps)
        return x + self.feed_forward(f)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm; `out.0` / `out.1` follow the checkpoint's Sequential indices."""

    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.eps = cfg.eps
        self.out = nn.ModuleList([nn.Linear(cfg.input_size, cfg.width), nn.LayerNorm(cfg.width, eps=cfg.eps)])

    def forward(self, x):
        lin, norm = self.out
        return layer_norm(lin(x), norm.weight, norm.bias, self.eps)


class LyricEncoder(nn.Module):
    def __init__(self, cfg: LyricEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = LinearEmbed(cfg)
        self.encoders = nn.ModuleList([ConformerLayer(cfg) for _ in range(cfg.blocks)])
        self.after_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x, mask, pe, rel_index, q_scale, trace: dict | None = None):
        """x [B, N, input_size]; mask [B, N] (nonzero = real token); pe [2N-1, width] fp32;
        rel_index [N, N] int64; q_scale [blocks] fp32 -> [B, N, width]."""
        x = self.embed(x) * math.sqrt(self.config.width)
        if trace is not None:
            trace["lyric_encoder.embed"] = x
        pe = pe.to(x.dtype)
        keep = mask != 0
        for n, layer in enumerate(self.encoders):
            x = layer(x, pe, rel_index, keep, q_scale[n])
        x = layer_norm(x, self.after_norm.weight, self.after_norm.bias, self.config.eps)
        if trace is not None:
            trace["lyric_encoder"] = x
        return x


def erg_q_scale(blocks: int, erg: bool) -> list[float]:
    return [ERG_SCALE if erg and n in ERG_LAYERS else 1.0 for n in range(blocks)]

"""ACE-Step v1 diffusion transformer in PyTorch, the oracle for the ONNX graphs (spec §4).

Two graphs, as the sampler uses them:
* `DiTEncode`: text hidden states + lyrics -> cross-attention context (once per condition);
* `DiTDecode`: one velocity evaluation for a stacked batch of rows.

Inputs and outputs are fp32 whatever the precision; the run dtype applies inside. Position
tables come in as inputs (`lofi_cuda.tables`). ERG is a per-row `q_scale` [B] (1 or 0.01)
applied to the q projections of blocks 15-19, so conditional and ERG-null rows share one batch.

The reference's latent `attention_mask` is always all ones (sequences are never padded), so it
is not an input: with ones it multiplies by 1 in self-attention and masks nothing in
cross-attention.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import DIT_CLIP as CLIP
from lofi.acestep.configs import DIT_ERG_BLOCKS as ERG_BLOCKS
from lofi.acestep.configs import DIT_ERG_SCALE as ERG_SCALE  # noqa: F401  (used by the tests/exporter)
from lofi.acestep.configs import DIT_GROUPS as GROUPS
from lofi.acestep.configs import DIT_UNUSED_PARTS as UNUSED_PARTS
from lofi.acestep.configs import DIT_UNUSED_PREFIXES as UNUSED_PREFIXES
from lofi.acestep.configs import DiTConfig
from lofi.acestep.tables import TIME_CHANNELS, time_frequencies

from convert.torch_port.common import drop_keys, load_strict, meta_init, rms_norm, run_dtype
from convert.torch_port.lyric_encoder import LyricEncoder, LyricEncoderConfig

def apply_rope(x, cos, sin):
    """x [B, N, H, d]; cos/sin [N, d] fp32. Pairs (2i, 2i+1) rotate, each element at its own
    frequency (spec §4.5); arithmetic in fp32."""
    xf = x.float()
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(xf.shape)
    return (xf * cos[:, None] + rot * sin[:, None]).to(x.dtype)


def _scale_rows(q, q_scale):
    """ERG: each row's q times its scale ([B,1,1] fp32), rounded back to the run dtype."""
    return q if q_scale is None else (q.float() * q_scale).to(q.dtype)


class PatchEmbed(nn.Module):
    """Conv(16x1, stride 16x1) -> GroupNorm(32) -> Conv 1x1, as two matmuls around a GroupNorm
    whose statistics span all frames (every frame sees the whole clip)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        hid = cfg.patch_hidden
        self.early_conv_layers = nn.ModuleList([nn.Linear(cfg.in_channels * cfg.patch_height, hid),
                                                nn.GroupNorm(GROUPS, hid, eps=cfg.norm_eps),
                                                nn.Linear(hid, cfg.width)])

    def forward(self, x):
        B, C, R, T = x.shape
        conv0, norm, conv2 = self.early_conv_layers
        y = conv0(x.permute(0, 3, 1, 2).reshape(B, T, C * R))             # per frame, order c*16+r
        yf = y.float().reshape(B, T, GROUPS, -1)
        mu = yf.mean(dim=(1, 3), keepdim=True)
        d = yf - mu
        var = (d * d).mean(dim=(1, 3), keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(B, T, -1).to(y.dtype)
        return conv2(y * norm.weight + norm.bias)


class TimestepEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_CHANNELS, cfg.width)
        self.linear_2 = nn.Linear(cfg.width, cfg.width)

    def forward(self, e):
        return self.linear_2(F.silu(self.linear_1(e)))


class LinearAttention(nn.Module):
    """ReLU linear self-attention with RoPE; sums in fp32, O(T d^2) per head."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.width
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = nn.Linear(D, D)
        self.to_k = nn.Linear(D, D)
        self.to_v = nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def forward(self, x, cos, sin, q_scale=None):
        B, T, D = x.shape
        H, d = self.heads, self.head_dim
        q = apply_rope(_scale_rows(self.to_q(x), q_scale).reshape(B, T, H, d), cos, sin)
        k = apply_rope(self.to_k(x).reshape(B, T, H, d), cos, sin)
        v = self.to_v(x).reshape(B, T, H, d)
        q = F.relu(q).float().transpose(1, 2)
        k = F.relu(k).float().transpose(1, 2)
        v = v.float().transpose(1, 2)
        # a ones column on V makes the same product carry the normaliser sum_s K_s.Q_t
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        o = q @ (k.transpose(-1, -2) @ v)                                  # [B, H, T, d+1]
        o = o[..., :d] / (o[..., d:] + 1e-15)
        o = o.transpose(1, 2).reshape(B, T, D).to(x.dtype)
        return torch.clamp(self.to_out[0](o), -CLIP, CLIP)


class CrossAttention(nn.Module):
    """Softmax attention from latent frames to the context; RoPE on q (frames) and k (context)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.width
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = nn.Linear(D, D)
        self.to_k = nn.Linear(D, D)
        self.to_v = nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def forward(self, x, ctx, key_bias, has_key, rope, rope_ctx, q_scale=None):
        B, T, D = x.shape
        L = ctx.shape[1]
        H, d = self.heads, self.head_dim
        q = apply_rope(_scale_rows(self.to_q(x), q_scale).reshape(B, T, H, d), *rope).transpose(1, 2)
        k = apply_rope(self.to_k(ctx).reshape(B, L, H, d), *rope_ctx).transpose(1, 2)
        v = self.to_v(ctx).reshape(B, L, H, d).transpose(1, 2)
        s = (q.float() @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(d)) + key_bias
        o = torch.softmax(s, dim=-1).to(v.dtype) @ v
        # a row whose keys are all masked is NaN in the reference; give it 0 instead
        o = torch.where(has_key, o, torch.zeros_like(o))
        return self.to_out[0](o.transpose(1, 2).reshape(B, T, D))


class DepthwiseConv3(nn.Module):
    """Depthwise Conv1d, kernel 3, zero padding 1, along time, as three shifted multiply-adds."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, channels))  # tap k multiplies u[t - 1 + k]
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, u):
        p = F.pad(u, (0, 0, 1, 1))
        T = u.shape[1]
        w = self.weight
        return p[:, :T] * w[0] + p[:, 1:T + 1] * w[1] + p[:, 2:T + 2] * w[2] + self.bias


class GLUMBConv(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        Fh = cfg.ffn_hidden
        self.inverted_conv = nn.Linear(cfg.width, 2 * Fh)
        self.depth_conv = DepthwiseConv3(2 * Fh)
        self.point_conv = nn.Linear(Fh, cfg.width, bias=False)

    def forward(self, x):
        u = self.depth_conv(F.silu(self.inverted_conv(x)))
        a, g = u.chunk(2, dim=-1)                                            # value, gate
        return self.point_conv(a * F.silu(g))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.width))
        self.attn = LinearAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.ff = GLUMBConv(cfg)

    def forward(self, h, temb6, rope, ctx, key_bias, has_key, rope_ctx, q_scale=None):
        mod = self.scale_shift_table[None] + temb6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        n = rms_norm(h, self.eps) * (1 + scale_msa) + shift_msa
        h = h + gate_msa * self.attn(n, rope[0], rope[1], q_scale)
        # cross-attention reads the raw residual stream: no norm, no modulation, no gate
        h = h + self.cross_attn(h, ctx, key_bias, has_key, rope, rope_ctx, q_scale)
        n = rms_norm(h, self.eps) * (1 + scale_mlp) + shift_mlp
        return h + gate_mlp * self.ff(n)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.zeros(2, cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch_height * cfg.out_channels)

    def forward(self, h, emb):
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        return self.linear(rms_norm(h, self.eps) * (1 + scale) + shift)


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
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.final_layer = FinalLayer(cfg)
        self.register_buffer("time_freqs", torch.from_numpy(time_frequencies()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.t_block.weight.dtype

    def encode(self, text_hidden, text_mask, lyric_ids, lyric_mask, pe, rel_index, lyric_q_scale,
               trace: dict | None = None):
        """-> (ctx [B, 1+Nt+Nl, D] fp32, ctx_mask [B, 1+Nt+Nl] fp32). Speaker is zero in v1, so
        its projection is exactly the bias."""
        dt = self.dtype
        B = text_hidden.shape[0]
        spk = self.speaker_embedder.bias[None, None].expand(B, 1, -1)
        txt = self.genre_embedder(text_hidden.to(dt))
        lyr = self.lyric_embs(lyric_ids)
        if trace is not None:
            trace.update({"speaker_embedder": spk[:, 0], "genre_embedder": txt, "lyric_embs": lyr})
        lyr = self.lyric_proj(self.lyric_encoder(lyr, lyric_mask, pe, rel_index, lyric_q_scale, trace))
        if trace is not None:
            trace["lyric_proj"] = lyr
        ctx = torch.cat([spk, txt, lyr], dim=1).float()
        ctx_mask = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, lyric_mask], dim=1).float()
        return ctx, ctx_mask

    def decode(self, x, timestep, ctx, ctx_mask, q_scale, cos, sin, cos_ctx, sin_ctx,
               trace: dict | None = None):
        """x [B,8,16,T], timestep [B] (t = 1000 sigma), ctx [B,L,D], ctx_mask [B,L], q_scale [B]
        (ERG rows 0.01, others 1), cos/sin [T,d], cos_ctx/sin_ctx [L,d] -> velocity [B,8,16,T] fp32."""
        cfg, dt = self.config, self.dtype
        x = x.to(dt)
        B, _, _, T = x.shape
        a = timestep.float()[:, None] * self.time_freqs[None]
        e = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)                 # cos first
        emb = self.timestep_embedder(e.to(dt))
        temb = self.t_block(F.silu(emb))
        h = self.proj_in(x)
        if trace is not None:
            trace.update({"time_proj": e, "timestep_embedder": emb, "t_block": temb, "proj_in": h})
        # only an exact 1 lets a key through, as the reference's where(mask == 1, 0, -inf)
        keep = ctx_mask == 1
        key_bias = torch.where(keep, torch.tensor(0.0), torch.tensor(float("-inf")))[:, None, None, :]
        has_key = keep.any(dim=1)[:, None, None, None]
        ctx = ctx.to(dt)
        qs = q_scale.float()[:, None, None]
        temb6 = temb.reshape(B, 6, cfg.width)
        rope, rope_ctx = (cos, sin), (cos_ctx, sin_ctx)
        for i, blk in enumerate(self.transformer_blocks):
            h = blk(h, temb6, rope, ctx, key_bias, has_key, rope_ctx, qs if i in ERG_BLOCKS else None)
            if trace is not None:
                trace[f"block.{i}"] = h
        y = self.final_layer(h, emb)                                         # [B, T, 16*8]
        v = y.reshape(B, T, cfg.patch_height, cfg.out_channels).permute(0, 3, 2, 1)
        return v.float()

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


class DiTEncode(nn.Module):
    """Graph wrapper: (text_hidden, text_mask, lyric_ids, lyric_mask, pe, rel_index, lyric_q_scale)
    -> (ctx, ctx_mask)."""

    def __init__(self, dit: ACEStepDiT):
        super().__init__()
        self.dit = dit

    def forward(self, text_hidden, text_mask, lyric_ids, lyric_mask, pe, rel_index, lyric_q_scale):
        return self.dit.encode(text_hidden, text_mask, lyric_ids, lyric_mask, pe, rel_index, lyric_q_scale)


class DiTDecode(nn.Module):
    """Graph wrapper: (x, timestep, ctx, ctx_mask, q_scale, cos, sin, cos_ctx, sin_ctx) -> velocity."""

    def __init__(self, dit: ACEStepDiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, timestep, ctx, ctx_mask, q_scale, cos, sin, cos_ctx, sin_ctx):
        return self.dit.decode(x, timestep, ctx, ctx_mask, q_scale, cos, sin, cos_ctx, sin_ctx)


def from_weights(cfg_dict: dict, raw: dict[str, np.ndarray], precision: str = "fp32",
                 source: str = "ace_step_transformer") -> ACEStepDiT:
    model = meta_init(ACEStepDiT, DiTConfig.from_dict(cfg_dict), LyricEncoderConfig.from_weights(raw))
    return load_strict(model, model.sanitize(raw), run_dtype(precision), source)


def load(checkpoint_root: str | Path, precision: str = "fp32") -> ACEStepDiT:
    cfg, raw = load_component(checkpoint_root, "transformer")
    return from_weights(cfg, raw, precision, str(component_dir(checkpoint_root, "transformer")))

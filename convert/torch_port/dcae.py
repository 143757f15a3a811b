"""Music DCAE (diffusers `AutoencoderDC` as ACE-Step v1 uses it) in PyTorch, the oracle for the ONNX graphs.

Channels-first NCHW throughout, so the checkpoint's conv weights load as they are. The graph
wrappers include ACE-Step's own latent and mel constants (spec §8.1, §8.4), so their IO is:
* `DCAEDecode`: DiT latents [B, 8, 16, T] -> log-mel [B, 2, 128, 8T];
* `DCAEEncode`: log-mel [B, 2, 128, F] -> DiT latents [B, 8, 16, F/8].

Half precision keeps the fp32 islands: RMS-norm statistics and the whole multiscale linear
attention (input upcast, sums and division in fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import DCAE_ATTN_EPS as ATTN_EPS
from lofi.acestep.configs import DCAE_BLOCK_TYPES as BLOCK_TYPES  # noqa: F401  (old name)
from lofi.acestep.configs import DCAE_MEL_MAX as MEL_MAX
from lofi.acestep.configs import DCAE_MEL_MIN as MEL_MIN
from lofi.acestep.configs import DCAE_NORM_EPS as NORM_EPS
from lofi.acestep.configs import DCAE_PARTS as PARTS
from lofi.acestep.configs import DCAE_SCALE_FACTOR as SCALE_FACTOR
from lofi.acestep.configs import DCAE_SHIFT_FACTOR as SHIFT_FACTOR
from lofi.acestep.configs import DCAEConfig
from lofi.acestep.tiling import dcae_attention_stages

from convert.torch_port.common import drop_keys, load_strict, meta_init, rms_norm, run_dtype


def repeat_channels(x, n: int):
    """torch repeat_interleave on channels (out channel k <- in channel k // n), export-friendly."""
    if n == 1:
        return x
    B, C, H, W = x.shape
    return x[:, :, None].expand(B, C, n, H, W).reshape(B, C * n, H, W)


def group_mean(x, size: int):
    """Mean over consecutive groups of `size` channels."""
    if size == 1:
        return x
    B, C, H, W = x.shape
    return x.reshape(B, C // size, size, H, W).mean(dim=2)


def upsample_nearest2(x):
    B, C, H, W = x.shape
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)


def pixel_shuffle2(x):
    """[B, C*4, H, W] -> [B, C, 2H, 2W]; out[c, 2i+a, 2j+b] = in[4c + 2a + b, i, j]."""
    B, C4, H, W = x.shape
    return x.reshape(B, C4 // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * H, 2 * W)


def pixel_unshuffle2(x):
    """Inverse of pixel_shuffle2: channel 4c + 2a + b <- in[c, 2i+a, 2j+b]."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)


class RMSNormC(nn.Module):
    """Per-pixel RMS norm over channels, fp32 statistics, then weight and bias."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.bias = nn.Parameter(torch.zeros(dims))

    def forward(self, x):
        y = rms_norm(x, NORM_EPS, dim=1).to(self.weight.dtype)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNormC(channels)

    def forward(self, x):
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)

    def forward(self, x):
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention over all H*W pixels plus multiscale branches. Groups of 3*head_dim
    consecutive channels of [q | k | v | ms(q|k|v)] are each split into Q, K, V (spec §8.3)."""

    def __init__(self, channels: int, head_dim: int, kernels: tuple):
        super().__init__()
        heads = channels // head_dim
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList([MultiscaleProjection(3 * inner, 3 * heads, k) for k in kernels])
        self.to_out = nn.Linear(inner * (1 + len(kernels)), channels, bias=False)
        self.norm_out = RMSNormC(channels)

    def forward(self, x):
        B, C, H, W = x.shape
        d = self.head_dim
        xl = x.permute(0, 2, 3, 1)
        qkv = torch.cat([self.to_q(xl), self.to_k(xl), self.to_v(xl)], dim=-1).permute(0, 3, 1, 2)
        z = torch.cat([qkv] + [ms(qkv) for ms in self.to_qkv_multiscale], dim=1).float()
        z = z.reshape(B, -1, 3 * d, H * W)                                   # [B, G, 3d, N]
        q, k, v = F.relu(z[:, :, :d]), F.relu(z[:, :, d:2 * d]), z[:, :, 2 * d:]
        # a ones row on V: the same product carries the normaliser sum_n K_n
        v = torch.cat([v, torch.ones_like(v[:, :, :1])], dim=2)             # [B, G, d+1, N]
        o = (v @ k.transpose(-1, -2)) @ q                                   # [B, G, d+1, N]
        o = o[:, :, :d] / (o[:, :, d:] + ATTN_EPS)
        o = o.reshape(B, -1, H, W).to(x.dtype)
        out = self.to_out(o.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNormC(channels)

    def forward(self, x):
        h = self.conv_depth(F.silu(self.conv_inverted(x)))
        a, g = h.chunk(2, dim=1)
        return x + self.norm(self.conv_point(a * F.silu(g)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernels: tuple):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernels)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x):
        return self.conv_out(self.attn(x))


class UpBlock(nn.Module):
    """Nearest x2 + conv3x3, plus the shortcut: channel repeat-interleave then pixel shuffle."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.repeats = cout * 4 // cin

    def forward(self, x):
        return self.conv(upsample_nearest2(x)) + pixel_shuffle2(repeat_channels(x, self.repeats))


class DownBlock(nn.Module):
    """Strided conv3x3, plus the shortcut: pixel unshuffle then mean over channel groups."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.group = cin * 4 // cout

    def forward(self, x):
        return self.conv(x) + group_mean(pixel_unshuffle2(x), self.group)


def _block(kind: str, channels: int, head_dim: int, kernels: tuple) -> nn.Module:
    return ResBlock(channels) if kind == "ResBlock" else EfficientViTBlock(channels, head_dim, kernels)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        ch = cfg.decoder_block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.in_repeats = ch[-1] // cfg.latent_channels
        self.cfg = cfg
        # up_blocks[i] (checkpoint order) runs in reverse: stage n-1 first
        self.up_blocks = nn.ModuleList()
        for i in range(n):
            stage = [UpBlock(ch[i + 1], ch[i])] if i < n - 1 else []
            stage += [_block(cfg.decoder_block_types[i], ch[i], cfg.attention_head_dim,
                             cfg.decoder_qkv_multiscales[i]) for _ in range(cfg.decoder_layers_per_block[i])]
            self.up_blocks.append(nn.ModuleList(stage))
        self.norm_out = RMSNormC(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def _stages(self):
        """(stages run whole, stages run in time tiles), in run order (lowest resolution first)."""
        order = list(reversed(self.up_blocks))
        k = dcae_attention_stages(self.cfg)
        return order[:k], order[k:]

    def low(self, z):
        """conv_in and the stages with global attention (the part that cannot be tiled)."""
        h = self.conv_in(z) + repeat_channels(z, self.in_repeats)
        for stage in self._stages()[0]:
            for blk in stage:
                h = blk(h)
        return h

    def up(self, h):
        """The convolution-only stages (exact in time tiles with lofi.acestep.tiling's halo)."""
        for stage in self._stages()[1]:
            for blk in stage:
                h = blk(h)
        return self.conv_out(F.relu(self.norm_out(h)))

    def forward(self, z):
        return self.up(self.low(z))


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        ch = cfg.encoder_block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            stage = [_block(cfg.encoder_block_types[i], ch[i], cfg.attention_head_dim,
                            cfg.encoder_qkv_multiscales[i]) for _ in range(cfg.encoder_layers_per_block[i])]
            if i < n - 1:
                stage.append(DownBlock(ch[i], ch[i + 1]))
            self.down_blocks.append(nn.ModuleList(stage))
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)
        self.out_group = ch[-1] // cfg.latent_channels

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down_blocks:
            for blk in stage:
                h = blk(h)
        return self.conv_out(h) + group_mean(h, self.out_group)


class DCAEDecode(nn.Module):
    """DiT latents [B, 8, 16, T] fp32 -> log-mel [B, 2, 128, 8T] fp32 (natural log)."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.decoder = Decoder(cfg)

    def forward(self, latents):
        dt = self.decoder.conv_in.weight.dtype
        m = self.decoder((latents / SCALE_FACTOR + SHIFT_FACTOR).to(dt)).float()
        return (m * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN


class DCAEDecodeLow(nn.Module):
    """The decoder's first half, run whole: DiT latents [B, 8, 16, T] fp32 -> hidden
    [B, C, 16, T] fp32 (the ONNX engine's `dcae_decode_low` graph; fp32 IO like every graph,
    the widening of a half-precision hidden state is exact)."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.decoder = Decoder(cfg)

    def forward(self, latents):
        dt = self.decoder.conv_in.weight.dtype
        return self.decoder.low((latents / SCALE_FACTOR + SHIFT_FACTOR).to(dt)).float()


class DCAEDecodeUp(nn.Module):
    """The second half, run in time tiles: hidden [B, C, 16, t] -> log-mel [B, 2, 128, 8t] fp32
    (the `dcae_decode_up` graph; shares DCAEDecodeLow's weights and key names)."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.decoder = Decoder(cfg)

    def forward(self, hidden):
        m = self.decoder.up(hidden.to(self.decoder.conv_in.weight.dtype)).float()
        return (m * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN


class DCAEEncode(nn.Module):
    """Log-mel [B, 2, 128, F] fp32 (F a multiple of 8) -> DiT latents [B, 8, 16, F/8] fp32."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)

    def forward(self, mel):
        dt = self.encoder.conv_in.weight.dtype
        x = ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5
        z = self.encoder(x.to(dt)).float()
        return (z - SHIFT_FACTOR) * SCALE_FACTOR


def sanitize(weights: dict[str, np.ndarray], part: str) -> dict[str, np.ndarray]:
    """Keep one part's keys (the other part is a separate graph, dropped here on purpose)."""
    other = [p for p in PARTS if p != part]
    return drop_keys(weights, prefixes=tuple(f"{p}." for p in other))


def from_weights(cfg_dict: dict, raw: dict[str, np.ndarray], part: str, precision: str = "fp32",
                 source: str = "music_dcae_f8c8", module: type | None = None) -> nn.Module:
    """`module`: DCAEDecodeLow or DCAEDecodeUp for the decoder's halves (default: the whole
    part). A half holds every decoder weight, as the strict loader wants; the exporter
    drops the unused ones as dead initialisers."""
    cfg = DCAEConfig.from_dict(cfg_dict)
    cls = module or (DCAEDecode if part == "decoder" else DCAEEncode)
    model = meta_init(cls, cfg)
    return load_strict(model, sanitize(raw, part), run_dtype(precision), source)


def load(checkpoint_root: str | Path, part: str = "decoder", precision: str = "fp32") -> nn.Module:
    """The decoder (DCAEDecode) or encoder (DCAEEncode) graph module."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    cfg, raw = load_component(checkpoint_root, "dcae")
    return from_weights(cfg, raw, part, precision, str(component_dir(checkpoint_root, "dcae")))

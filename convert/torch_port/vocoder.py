"""ACE-Step's vocoder (ADaMoSHiFiGANV1) in PyTorch, the oracle for the ONNX graphs (spec §9).

Graph interface: `forward(mel [B, 128, F] fp32) -> wave [B, 512·F] fp32`. Channels-first,
so the checkpoint's conv weights load as they are once weight norm is folded.

Half precision, as in the MLX port: the backbone's and HiFi-GAN's residual streams are not
normalised and grow along the network, so they are carried in fp32; each conv or linear reads
its input in the run dtype and its result is widened to fp32 before the bias. Norm statistics
are fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import VocoderConfig

from convert.torch_port.common import drop_keys, fold_weight_norm, layer_norm, load_strict, meta_init, run_dtype


class Conv(nn.Module):
    """Conv1d (or ConvTranspose1d) computing in the weight's dtype, bias added in fp32."""

    def __init__(self, cin, cout, kernel, dilation=1, padding=None, groups=1, transpose_stride=0):
        super().__init__()
        self.stride = transpose_stride
        shape = (cin, cout, kernel) if transpose_stride else (cout, cin // groups, kernel)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.dilation, self.groups = dilation, groups
        if transpose_stride:
            self.padding = (kernel - transpose_stride) // 2
        else:
            self.padding = dilation * (kernel - 1) // 2 if padding is None else padding

    def forward(self, x):
        x = x.to(self.weight.dtype)
        if self.stride:
            y = F.conv_transpose1d(x, self.weight, stride=self.stride, padding=self.padding)
        else:
            y = F.conv1d(x, self.weight, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return y.float() + self.bias.float()[:, None]


class LayerNormC(nn.Module):
    """LayerNorm over channels (axis 1 of [B, C, L]), eps 1e-6, fp32 throughout."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.bias = nn.Parameter(torch.zeros(dims))
        self.eps = eps

    def forward(self, x):
        return layer_norm(x.float(), self.weight.float()[:, None], self.bias.float()[:, None], self.eps, dim=1)


class Linear(nn.Module):
    """Per-frame linear over channels of [B, C, L] (ConvNeXt pointwise / the 1x1 stage convs)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        y = torch.matmul(self.weight, x.to(self.weight.dtype))             # [B, cout, L]
        return y.float() + self.bias.float()[:, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.dwconv = Conv(dims, dims, kernel, groups=dims)
        self.norm = LayerNormC(dims)
        self.pwconv1 = Linear(dims, 4 * dims)
        self.pwconv2 = Linear(4 * dims, dims)
        self.gamma = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x)))))  # exact erf GELU
        return x + self.gamma.float()[:, None] * h


class StemConv(Conv):
    """The first conv pads by replicating the edge frames (`padding_mode="replicate"`)."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(cin, cout, kernel, padding=0)
        self.pad = (kernel - 1) // 2

    def forward(self, x):
        return super().forward(F.pad(x, (self.pad, self.pad), mode="replicate"))


class Backbone(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        d, k = cfg.dims, cfg.kernel_sizes[0]
        # names follow the checkpoint: [conv, norm] for the stem, [norm, 1x1 conv] between stages
        layers = [nn.ModuleList([StemConv(cfg.input_channels, d[0], k), LayerNormC(d[0])])]
        layers += [nn.ModuleList([LayerNormC(d[i - 1]), Linear(d[i - 1], d[i])]) for i in range(1, len(d))]
        self.channel_layers = nn.ModuleList(layers)
        self.stages = nn.ModuleList([nn.ModuleList([ConvNeXtBlock(d[i], k) for _ in range(cfg.depths[i])])
                                     for i in range(len(d))])
        self.norm = LayerNormC(d[-1])

    def forward(self, x):
        for (a, b), stage in zip(self.channel_layers, self.stages):
            x = b(a(x))
            for block in stage:
                x = block(x)
        return self.norm(x)


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1 with SiLU: per dilation d, x += conv_1(silu(conv_d(silu(x))))."""

    def __init__(self, dims: int, kernel: int, dilations: list):
        super().__init__()
        self.convs1 = nn.ModuleList([Conv(dims, dims, kernel, dilation=d) for d in dilations])
        self.convs2 = nn.ModuleList([Conv(dims, dims, kernel) for _ in dilations])

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.silu(c1(F.silu(x))))
        return x


class Head(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        ch = cfg.upsample_initial_channel
        self.conv_pre = Conv(cfg.num_mels, ch, cfg.pre_conv_kernel_size)
        ups, res = [], []
        for u, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            cin, cout = ch // 2 ** u, ch // 2 ** (u + 1)
            ups.append(Conv(cin, cout, kernel, transpose_stride=rate))
            res += [ResBlock(cout, k, ds) for k, ds in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)]
        self.ups = nn.ModuleList(ups)
        self.resblocks = nn.ModuleList(res)
        self.conv_post = Conv(ch // 2 ** len(ups), 1, cfg.post_conv_kernel_size)

    def forward(self, x, taps: dict | None = None):
        x = self.conv_pre(x)
        if taps is not None:
            taps["head.conv_pre"] = x
        n = len(self.resblocks) // len(self.ups)
        for u, up in enumerate(self.ups):
            x = up(F.silu(x))
            if taps is not None:
                taps[f"head.ups.{u}"] = x
            blocks = self.resblocks[u * n:(u + 1) * n]
            acc = blocks[0](x)
            for rb in blocks[1:]:
                acc = acc + rb(x)
            x = acc / n
        return torch.tanh(self.conv_post(F.silu(x)))


class Vocoder(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = Head(cfg)

    def forward(self, mel, taps: dict | None = None):
        """mel [B, 128, F] -> wave [B, 512·F] fp32."""
        x = self.backbone(mel.float())
        if taps is not None:
            taps["backbone"] = x
        y = self.head(x, taps)
        return y.reshape(y.shape[0], -1)


_WN = ((".weight_g", ".weight_v"),
       (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def sanitize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold weight norm; 1x1 stage convs become linears. The STFT window and mel filterbank
    buffers are dropped on purpose: the log-mel front end is numpy (lofi.audio)."""
    weights = dict(drop_keys(weights, prefixes=("mel_transform.",)))
    for g_suffix, v_suffix in _WN:
        for key in [k for k in weights if k.endswith(g_suffix)]:
            base = key[: -len(g_suffix)]
            if base + v_suffix not in weights:
                continue  # left as is: load_strict reports the unpaired key
            g, v = weights.pop(key), weights.pop(base + v_suffix)
            # axis 0: output channel of a Conv1d, input channel of a ConvTranspose1d
            weights[base + ".weight"] = fold_weight_norm(g, v).astype(np.float32)
    out = {}
    for k, w in weights.items():
        if (k.startswith("backbone.channel_layers.") and not k.startswith("backbone.channel_layers.0.")
                and k.endswith(".weight") and w.ndim == 3):
            w = w[:, :, 0]                                                   # 1x1 conv -> linear
        out[k] = w
    return out


def from_weights(cfg_dict: dict, raw: dict[str, np.ndarray], precision: str = "fp32",
                 source: str = "music_vocoder") -> Vocoder:
    return load_strict(meta_init(Vocoder, VocoderConfig.from_dict(cfg_dict)), sanitize(raw), run_dtype(precision), source)


def load(checkpoint_root: str | Path, precision: str = "fp32") -> Vocoder:
    cfg, raw = load_component(checkpoint_root, "vocoder")
    return from_weights(cfg, raw, precision, str(component_dir(checkpoint_root, "vocoder")))

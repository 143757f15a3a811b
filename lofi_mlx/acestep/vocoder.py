"""ACE-Step's vocoder (ADaMoSHiFiGANV1): log-mel [B, 128, F] -> 44.1 kHz waveform [B, 512·F].

A ConvNeXt-1D backbone turns the mel into `num_mels` features per frame; a HiFi-GAN generator
(weight-normed convs, folded at load) upsamples them ×512 to audio (spec §9). The backbone runs
channels-last `[B, L, C]` (its 1x1 convs are Linears); the HiFi-GAN head runs channels-first
`[B, C, L]`, every conv as im2col + one GEMM with time as the long axis (`conv_cf`). The log-mel front end of the checkpoint
(`mel_transform.*`) is recomputed in numpy by `lofi.audio.log_mel`.

CPU speed (full size, 10 s stereo: ~17.4-19 s -> ~15.3 s, measured): bias + SiLU + residual add
(+ the ResBlock mean) fused into one pass after each GEMM, a cheaper exp rounding in SiLU, one
merged im2col for the ResBlocks' first convs on narrow levels, and the batch halves (stereo
channels) on two streams so single-threaded elementwise work overlaps the BLAS calls.

Half precision (fp16/bf16): the backbone's and the HiFi-GAN's residual streams are not
normalised and grow along the network, so they are carried in fp32; every convolution and
linear reads its input cast to the run dtype and its result is widened back to fp32 before the
bias, the residual add, the ResBlock average and the final tanh. Norm statistics and the
(elementwise) depthwise convs are fp32 too. This costs activation bandwidth, not weight memory;
sums along the residual streams cannot overflow, only a single conv input beyond ±65504 could.

Full length (240 s: 20 664 mel frames -> 10.5 M samples per channel) needs several GB of conv
workspace in one pass; `Vocoder.decode` runs overlapping windows with exact halos instead: the
backbone's (long windows, whole-length features) and then the head's, so the head, nearly all
of the work, recomputes only its own receptive field at each window edge.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from lofi.checkpoint import component_dir, deferred, load_component
from lofi.acestep.configs import VocoderConfig
from lofi.acestep.tiling import polyphase_span, vocoder_backbone_halo, vocoder_halo, vocoder_head_halo, windows
from lofi.errors import INVALID_PARAMS, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn
from lofi_mlx.acestep.common import DTYPES
from lofi_mlx.acestep.common import window_buffers
from lofi_mlx.acestep.common import drop_keys
from lofi_mlx.acestep.common import fold_weight_norm
from lofi_mlx.acestep.common import fused
from lofi_mlx.acestep.common import gelu
from lofi_mlx.acestep.common import layer_norm
from lofi_mlx.acestep.common import load_strict
from lofi_mlx.acestep.common import silu_f32

F32 = mx.float32
# Mel frames per decoding window (`Vocoder.decode`). Measured at full width, 30 s, fp32 on a
# 2-core CPU (benchmarks/RESULTS.md): working set above the weights 1.79 / 1.23 / 0.74 GiB for
# 2048 / 1024 / 512, and 512 was also the fastest (the halo's extra work, 14 % since the head
# has its own halo, costs less than the larger buffers' cache misses and page faults).
TILE = 512
# The backbone's windows: its work is a few per cent of the head's, its working set small.
BACKBONE_TILE = 2048


def _to(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5·2^23: adding it to |v| < 2^22 in fp32 rounds v to an integer


def _silu_cpu(x):
    """fp32 SiLU x / (1 + e^−x), e^z = 2^n · e^r by a degree-8 Taylor polynomial (the scheme
    of `common.exp_f32`, |rel err| < 2e-7), but n rounded by the 1.5·2^23 trick instead of
    floor: ~30% faster per element on the CPU, where the HiFi-GAN head spends ~15% of its
    time in SiLU (measured). Only inside CPU-compiled kernels (no fast-math reassociation)."""
    z = mx.clip(-x, -87.0, 88.0)
    n = (z * _LOG2E + _ROUND) - _ROUND
    r = (z - n * _LN2_HI) - n * _LN2_LO
    p = r * (1.0 / 40320) + 1.0 / 5040
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + c
    return x / (1.0 + p * mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32))


def _per_device(fn):
    """`fn(act, *arrays)` compiled twice: with `_silu_cpu` for the CPU, `common.silu_f32` elsewhere
    (GPU compilers may reassociate the rounding trick away)."""
    cpu, other = fused(partial(fn, _silu_cpu)), fused(partial(fn, silu_f32))
    return lambda *args: (cpu if mx.default_device() == mx.cpu else other)(*args)


@_per_device
def _silu(act, x):
    return act(_to(x, F32))


@_per_device
def _bias_silu(act, y, b):
    return act(y.astype(F32) + b.astype(F32)[:, None])


@fused
def _bias_residual(x, y, b):
    return x + (y.astype(F32) + b.astype(F32)[:, None])


@fused
def _bias_residual_acc(acc, x, y, b, scale):
    """(acc + x + y + b)·scale: a level's ResBlock sum (and mean) taken in the same pass."""
    return (acc + (x + (y.astype(F32) + b.astype(F32)[:, None]))) * scale


@_per_device
def _bias_residual_silu(act, x, y, b):
    """(x + y + b, its SiLU) in one pass: the next conv of a ResBlock reads the SiLU."""
    x = x + (y.astype(F32) + b.astype(F32)[:, None])
    return x, act(x)


_STREAMS: list = []


def _cpu_streams(n: int) -> list:
    """Extra CPU streams (each its own scheduler thread), made once per process."""
    while len(_STREAMS) < n:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[:n]


def conv_cf(x, w, dilation: int = 1, budget: int = 1 << 26):
    """Channels-first conv1d without padding: x `[B, in, L]`, w `[out, K, in]` ->
    `[B, out, L − dilation·(K−1)]`, out[t] = Σ_j w[:, j] · x[t + j·dilation].

    im2col + GEMM: the K shifted (dilated) views stacked on the channel axis, then one
    `[out, K·in] @ [K·in, L]` product. Channels-first keeps time as the GEMM's long axis, which
    stays efficient down to 8 channels, and dilation needs no reshuffle. MLX's CPU conv1d runs
    dilated kernels ~70x slower and small-channel ones at a third of GEMM speed (measured).
    Taps go in groups so the stacked copy stays under `budget` elements (long inputs)."""
    o, k, i = w.shape
    n = x.shape[-1] - dilation * (k - 1)
    step = max(1, min(k, budget // max(1, x.shape[0] * i * n)))
    w2 = w.reshape(o, k * i)
    y = None
    for j0 in range(0, k, step):
        j1 = min(k, j0 + step)
        views = [x[:, :, j * dilation:j * dilation + n] for j in range(j0, j1)]
        cols = views[0] if len(views) == 1 else mx.concatenate(views, axis=1)
        part = w2[:, j0 * i:j1 * i] @ cols
        y = part if y is None else y + part
    return y


class Conv(nn.Module):
    """Conv1d, weight `[out, K, in]`; zero padding keeps the length (`dilation·(K−1)/2` each side).

    `forward_cf` is the channels-first form the HiFi-GAN head runs in (see `conv_cf`);
    calling the module takes and returns channels-last `[B, L, C]`."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, padding: int | None = None):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, cin))
        self.bias = mx.zeros((cout,))
        self.dilation = dilation
        self.padding = dilation * (kernel - 1) // 2 if padding is None else padding

    def conv_nobias(self, x):
        x = _to(x, self.weight.dtype)
        if self.padding:
            x = mx.pad(x, [(0, 0), (0, 0), (self.padding, self.padding)])
        return conv_cf(x, self.weight, self.dilation)

    def forward_cf(self, x):
        return _to(self.conv_nobias(x), F32) + _to(self.bias, F32)[:, None]

    def __call__(self, x):
        return self.forward_cf(x.transpose(0, 2, 1)).transpose(0, 2, 1)


class ConvTranspose(nn.Module):
    """ConvTranspose1d `L -> stride·L` (kernel − 2·padding = stride), weight `[out, K, in]`
    (MLX's layout and tap order: torch's `[in, out, K]` transposed, no flip).

    Run in polyphase form: one ordinary conv to `stride·out` channels (one group per output phase
    r), then the phases interleaved in time. Output q·stride + r reads inputs q − j, j in
    [jmin, jmax], through tap j·stride + r + padding. MLX's CPU conv_transpose1d is ~70x slower
    than a GEMM conv (measured); the kernel rearrangement is a small gather per call."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        padding = (kernel - stride) // 2
        self.weight = mx.zeros((cout, kernel, cin))
        self.bias = mx.zeros((cout,))
        self.stride = stride
        self.jmin, self.jmax = polyphase_span(kernel, stride, padding)
        m = np.arange(self.jmax - self.jmin + 1)
        taps = (self.jmax - m)[None, :] * stride + np.arange(stride)[:, None] + padding  # [r, m]
        # out-of-range taps read an appended zero tap (index `kernel`)
        self.taps = np.where((taps >= 0) & (taps < kernel), taps, kernel).reshape(-1).astype(np.int32)

    def polyphase_weight(self):
        """`[stride·out, M, in]`, output channel r·out + o."""
        w = self.weight
        o, _, i = w.shape
        w = mx.concatenate([w, mx.zeros((o, 1, i), dtype=w.dtype)], axis=1)
        w = mx.take(w, mx.array(self.taps), axis=1).reshape(o, self.stride, -1, i)
        return w.transpose(1, 0, 2, 3).reshape(self.stride * o, -1, i)

    def forward_cf(self, x):
        """Channels-first `[B, in, L] -> [B, out, stride·L]`."""
        b, _, n = x.shape
        x = mx.pad(_to(x, self.weight.dtype), [(0, 0), (0, 0), (self.jmax, -self.jmin)])
        y = conv_cf(x, self.polyphase_weight())  # [B, stride·out, n], channel r·out + o
        y = y.reshape(b, self.stride, -1, n).transpose(0, 2, 3, 1).reshape(b, -1, n * self.stride)
        return _to(y, F32) + _to(self.bias, F32)[:, None]

    def __call__(self, x):
        return self.forward_cf(x.transpose(0, 2, 1)).transpose(0, 2, 1)


class Linear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = mx.zeros((cout, cin))
        self.bias = mx.zeros((cout,))

    def __call__(self, x):
        return _to(_to(x, self.weight.dtype) @ self.weight.T, F32) + _to(self.bias, F32)


class LayerNorm(nn.Module):
    """LayerNorm over channels, eps 1e-6. Channels are the last axis here, so the reference's
    channels-first and channels-last variants are the same operation; fp32 statistics."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return layer_norm(_to(x, F32), _to(self.weight, F32), _to(self.bias, F32), self.eps)


class DepthwiseConv(nn.Module):
    """Depthwise Conv1d, zero padding `(K−1)/2`, weight `[C, K, 1]`. Run as K shifted
    multiply-adds: MLX's grouped conv is ~8x slower than that on CPU (measured)."""

    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((dims, kernel, 1))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        n = x.shape[1]
        k = self.weight.shape[1]
        w = _to(self.weight[:, :, 0].T, F32)  # [K, C]
        xp = mx.pad(_to(x, F32), [(0, 0), ((k - 1) // 2, (k - 1) // 2), (0, 0)])
        y = xp[:, 0:n] * w[0]
        for j in range(1, k):  # over the kernel taps, not over time
            y = y + xp[:, j:j + n] * w[j]
        return y + _to(self.bias, F32)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dims: int, kernel: int = 7):
        super().__init__()
        self.dwconv = DepthwiseConv(dims, kernel)
        self.norm = LayerNorm(dims)
        self.pwconv1 = Linear(dims, 4 * dims)
        self.pwconv2 = Linear(4 * dims, dims)
        self.gamma = mx.ones((dims,))

    def __call__(self, x):
        h = self.pwconv2(gelu(self.pwconv1(self.norm(self.dwconv(x)))))  # exact erf GELU
        return x + _to(self.gamma, F32) * h


class StemConv(Conv):
    """The first conv pads by replicating the edge frames (`padding_mode="replicate"`)."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(cin, cout, kernel, padding=0)
        self.pad = (kernel - 1) // 2

    def __call__(self, x):
        x = mx.pad(x, [(0, 0), (self.pad, self.pad), (0, 0)], mode="edge")
        return super().__call__(x)


class Backbone(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        d = cfg.dims
        k = cfg.kernel_sizes[0]
        # Names follow the checkpoint: [conv, norm] for the stem, [norm, 1x1 conv] between stages.
        self.channel_layers = [[StemConv(cfg.input_channels, d[0], k), LayerNorm(d[0])]]
        self.channel_layers += [[LayerNorm(d[i - 1]), Linear(d[i - 1], d[i])] for i in range(1, len(d))]
        self.stages = [[ConvNeXtBlock(d[i], k) for _ in range(cfg.depths[i])] for i in range(len(d))]
        self.norm = LayerNorm(d[-1])

    def __call__(self, x):
        for (a, b), stage in zip(self.channel_layers, self.stages):
            x = b(a(x))
            for block in stage:
                x = block(x)
        return self.norm(x)


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1 with SiLU: per dilation d, x += conv_1(silu(conv_d(silu(x))))."""

    def __init__(self, dims: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = [Conv(dims, dims, kernel, dilation=d) for d in dilations]
        self.convs2 = [Conv(dims, dims, kernel) for _ in dilations]

    def __call__(self, x, silu_x=None, first=None, acc=None, scale=None):
        """Channels-first `[B, C, L]`, like the rest of the head. `silu_x`: silu(x) if the caller
        has it (the blocks of one level share their input); `first`: the first conv's output
        without bias, if the caller computed it. Bias, SiLU and residual add are fused into one
        pass each after the GEMM. With `acc`, returns (acc + block(x))·scale instead."""
        s = _silu(x) if silu_x is None else silu_x
        last = len(self.convs1) - 1
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            y = first if i == 0 and first is not None else c1.conv_nobias(s)
            h = _bias_silu(y, c1.bias)
            if i < last:
                x, s = _bias_residual_silu(x, c2.conv_nobias(h), c2.bias)
            elif acc is not None:
                x = _bias_residual_acc(acc, x, c2.conv_nobias(h), c2.bias, scale)
            else:
                x = _bias_residual(x, c2.conv_nobias(h), c2.bias)
        return x


def _shared_first_convs(blocks, sx, max_channels: int = 64):
    """The blocks' first convs all read `sx` with dilation 1; on narrow levels (memory-bound:
    the im2col copy costs more than the GEMM) run them as one conv whose kernels are
    zero-padded to the longest: one im2col of Kmax taps instead of ΣK. Else [None, ...]."""
    convs = [rb.convs1[0] for rb in blocks]
    kmax = max(c.weight.shape[1] for c in convs)
    if (sx.shape[1] > max_channels or len(convs) < 2 or any(c.dilation != 1 for c in convs)
            or any((kmax - c.weight.shape[1]) % 2 for c in convs)):
        return [None] * len(blocks)
    ws = []
    for c in convs:
        e = (kmax - c.weight.shape[1]) // 2
        ws.append(mx.pad(c.weight, [(0, 0), (e, e), (0, 0)]) if e else c.weight)
    merged = Conv(sx.shape[1], len(convs) * sx.shape[1], kmax)
    merged.weight = mx.concatenate(ws, axis=0)
    y = merged.conv_nobias(sx)
    return mx.split(y, len(convs), axis=1)


class Head(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        ch = cfg.upsample_initial_channel
        self.conv_pre = Conv(cfg.num_mels, ch, cfg.pre_conv_kernel_size)
        self.ups = []
        self.resblocks = []
        for u, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            cin, cout = ch // 2 ** u, ch // 2 ** (u + 1)
            self.ups.append(ConvTranspose(cin, cout, kernel, rate))
            self.resblocks += [ResBlock(cout, k, ds) for k, ds in
                               zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)]
        self.conv_post = Conv(ch // 2 ** len(self.ups), 1, cfg.post_conv_kernel_size)

    def __call__(self, x, taps: dict | None = None):
        """Backbone features `[B, F, C]` (channels-last) -> `[B, 1, hop·F]`. Runs channels-first
        (`conv_cf`); taps are stored channels-last.

        On the CPU a batch (the stereo pair) is split in two halves run on two streams: MLX's
        elementwise ops (SiLU, im2col copies) are single-threaded, so one half's copies overlap
        the other half's BLAS calls (~15% faster on small-channel levels, measured)."""
        b = x.shape[0]
        if taps is None and b > 1 and mx.default_device() == mx.cpu:
            h = b // 2
            outs = []
            for part, stream in zip((x[:h], x[h:]), _cpu_streams(2)):
                with mx.stream(stream):
                    outs.append(self._run(part))
            return mx.concatenate(outs, axis=0)
        return self._run(x, taps)

    def _run(self, x, taps: dict | None = None):
        x = self.conv_pre.forward_cf(x.transpose(0, 2, 1))
        if taps is not None:
            taps["head.conv_pre"] = x.transpose(0, 2, 1)
        n = len(self.resblocks) // len(self.ups)
        for u, up in enumerate(self.ups):
            x = up.forward_cf(_silu(x))
            if taps is not None:
                taps[f"head.ups.{u}"] = x.transpose(0, 2, 1)
            blocks = self.resblocks[u * n:(u + 1) * n]
            sx = _silu(x)
            firsts = _shared_first_convs(blocks, sx)
            acc = blocks[0](x, sx, firsts[0])
            one, mean = mx.array(1.0, F32), mx.array(1.0 / n, F32)
            for i, (rb, f) in enumerate(zip(blocks[1:], firsts[1:]), 2):
                acc = rb(x, sx, f, acc, mean if i == n else one)
            x = acc
        return mx.tanh(self.conv_post.forward_cf(_silu(x)))


class Vocoder(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = Head(cfg)

    @property
    def dtype(self):
        return self.head.conv_pre.weight.dtype

    def forward(self, mel: mx.array, taps: dict | None = None) -> mx.array:
        """mel `[B, 128, F]` (channels-first, natural-log magnitude) -> wave `[B, hop·F]` fp32.

        `taps`, if given, receives the channels-last intermediates `backbone`, `head.conv_pre`
        and `head.ups.{u}` (for parity tests).
        """
        self._check(mel)
        x = self.backbone(_to(mx.array(mel), F32).transpose(0, 2, 1))
        if taps is not None:
            taps["backbone"] = x
        y = self.head(x, taps)
        return y.reshape(y.shape[0], -1)

    def __call__(self, mel: mx.array) -> mx.array:
        return self.forward(mel)

    def _check(self, mel) -> None:
        if len(mel.shape) != 3 or mel.shape[1] != self.cfg.input_channels:
            raise LofiError(INVALID_PARAMS, f"vocoder input must be [B, {self.cfg.input_channels}, F], "
                            f"got {list(mel.shape)}")

    def receptive_field(self) -> int:
        """Mel frames on each side that can influence one output sample (rounded up)."""
        return vocoder_halo(self.cfg)

    def features(self, mel: mx.array, tile: int = BACKBONE_TILE, halo: int | None = None) -> mx.array:
        """The backbone's features `[B, F, C]` (fp32, channels-last) of a whole mel, in windows
        of `tile` frames reaching `halo` frames (default: its receptive field) to each side."""
        n = mel.shape[-1]
        halo = vocoder_backbone_halo(self.cfg) if halo is None else halo
        x = _to(mx.array(mel), F32).transpose(0, 2, 1)
        feats = []
        for w in windows(n, tile, halo):
            f = self.backbone(x[:, w.a:w.b])[:, w.s - w.a:w.e - w.a]
            mx.eval(f)
            feats.append(f)
        return feats[0] if len(feats) == 1 else mx.concatenate(feats, axis=1)

    def decode(self, mel: mx.array, chunk_frames: int | None = TILE, halo: int | None = None,
               backbone_halo: int | None = None) -> mx.array:
        """Like `__call__`, in windows, each evaluated before the next, so memory is one
        window's working set at any length.

        The backbone runs first in long windows (`BACKBONE_TILE`, its own halo) into the
        whole-length features (4 KB per frame and channel pair); the head then runs in windows of
        at most `chunk_frames` feature frames reaching `halo` frames (default: the head's
        receptive field) past the tile on both sides, of which only the tile is kept
        (lofi.acestep.tiling.windows). The result equals the whole-sequence forward. Halos
        split this way cost the head 36 frames a side instead of the whole vocoder's 93.
        """
        n = mel.shape[-1]
        if not chunk_frames or n <= chunk_frames:
            return self.forward(mel)
        self._check(mel)
        halo = vocoder_head_halo(self.cfg) if halo is None else halo
        hop = self.cfg.hop
        with window_buffers():
            feats = self.features(mel, max(chunk_frames, BACKBONE_TILE), backbone_halo)
            parts = []
            for w in windows(n, chunk_frames, halo):
                y = self.head(feats[:, w.a:w.b])
                y = y.reshape(y.shape[0], -1)[:, (w.s - w.a) * hop:(w.e - w.a) * hop]
                mx.eval(y)  # one window's activations at a time
                parts.append(y)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


_WN = ((".weight_g", ".weight_v"),
       (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def sanitize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map diffusers `ADaMoSHiFiGANV1` keys to this module: fold weight norm, MLX conv layouts."""
    # The STFT window and mel filterbank buffers are rebuilt in numpy (lofi_mlx.audio).
    weights = dict(drop_keys(weights, prefixes=("mel_transform.",)))
    for g_suffix, v_suffix in _WN:
        for key in [k for k in weights if k.endswith(g_suffix)]:
            base = key[: -len(g_suffix)]
            if base + v_suffix not in weights:
                continue  # left as is: load_strict reports the unpaired key
            g = weights.pop(key)
            v = weights.pop(base + v_suffix)
            # axis 0 is the output channel of a Conv1d and the input channel of a ConvTranspose1d;
            # folded when the loader converts it, so one folded tensor exists at a time
            weights[base + ".weight"] = deferred(
                v.shape, np.float32, lambda g=g, v=v: fold_weight_norm(g, v).astype(np.float32))
    out = {}
    for k, w in weights.items():
        if k.endswith(".weight") and w.ndim == 3:
            if k.startswith("head.ups."):
                w = w.transpose(1, 2, 0)  # ConvTranspose1d [in, out, K] -> [out, K, in]
            elif k.startswith("backbone.channel_layers.") and not k.startswith("backbone.channel_layers.0."):
                w = w[:, :, 0] if w.shape[2] == 1 else w  # 1x1 conv -> linear [out, in]
            else:
                w = w.transpose(0, 2, 1)  # Conv1d [out, in/groups, K] -> [out, K, in/groups]
        out[k] = w
    return out


def load(checkpoint_root: str | Path, precision: str = "fp32") -> Vocoder:
    if precision not in DTYPES:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    cfg_dict, raw = load_component(checkpoint_root, "vocoder")
    cfg = VocoderConfig.from_dict(cfg_dict)
    return from_weights(cfg, raw, precision, str(component_dir(checkpoint_root, "vocoder")))


def from_weights(cfg: VocoderConfig, raw: dict[str, np.ndarray], precision: str = "fp32",
                 source: str = "music_vocoder") -> Vocoder:
    """Build from raw checkpoint tensors (strict: every key must be used)."""
    return load_strict(Vocoder(cfg), sanitize(raw), DTYPES[precision], source)

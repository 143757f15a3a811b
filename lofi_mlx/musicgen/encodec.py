"""EnCodec 32 kHz decoder (transformers EncodecModel.decode as MusicGen calls it): residual
vector-quantizer lookup (sum of the codebook embeddings) -> SEANet decoder -> waveform.

SEANet: conv(k7) -> LSTM stack (+skip) -> per ratio r [ELU, ConvTranspose1d(k=2r, stride r),
residual blocks] -> ELU -> conv(k7). Non-causal convs reflect-pad left = total - total//2,
right = total//2 (+ the extra right padding that makes the last frame whole); transposed convs
are trimmed the same way. Weight norm is folded at load (w = g v / ||v||, norm over every axis
but 0). Channels-last [B, T, C] inside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lofi.musicgen.configs import EncodecConfig, MusicgenConfig, load_weights
from lofi_mlx.acestep.common import drop_keys, fold_weight_norm, load_strict
from lofi_mlx.mlxrt import mx, nn


def _reflect_pad(x, left: int, right: int):
    """torch F.pad(mode='reflect') on axis 1 of [B, T, C], zero-extended first when T is too short
    (EncodecConv1d._pad1d)."""
    if left == 0 and right == 0:
        return x
    n = x.shape[1]
    extra = 0
    if n <= max(left, right):
        extra = max(left, right) - n + 1
        x = mx.pad(x, [(0, 0), (0, extra), (0, 0)])
        n += extra
    parts = []
    if left:
        parts.append(x[:, 1:left + 1][:, ::-1])
    parts.append(x)
    if right:
        parts.append(x[:, n - right - 1:n - 1][:, ::-1])
    y = mx.concatenate(parts, axis=1)
    return y[:, :y.shape[1] - extra] if extra else y


class Conv(nn.Module):
    """EncodecConv1d, non-causal, stride 1 (all the decoder uses)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, cin))
        self.bias = mx.zeros((cout,))
        self.dilation = dilation
        self.total = (kernel - 1) * dilation  # effective kernel - stride

    def __call__(self, x):
        right = self.total // 2
        x = _reflect_pad(x, self.total - right, right)
        return mx.conv1d(x, self.weight, dilation=self.dilation) + self.bias


class ConvTranspose(nn.Module):
    """EncodecConvTranspose1d with kernel 2r, stride r, as one GEMM: each input frame yields 2r
    output samples; the second half of frame t overlaps the first half of frame t+1."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.weight = mx.zeros((cin, 2 * stride * cout))  # [in, (tap, out)]
        self.bias = mx.zeros((cout,))

    def __call__(self, x):
        b, t, _ = x.shape
        r = self.stride
        cout = self.bias.shape[0]
        y = (x @ self.weight).reshape(b, t, 2, r, cout)
        zero = mx.zeros((b, 1, r, cout), y.dtype)
        full = mx.concatenate([y[:, :, 0], zero], axis=1) + mx.concatenate([zero, y[:, :, 1]], axis=1)
        full = full.reshape(b, (t + 1) * r, cout) + self.bias
        right = r // 2  # padding_total = kernel - stride = r
        return full[:, r - right:(t + 1) * r - right]


class LSTM(nn.Module):
    """torch.nn.LSTM (gates i, f, g, o; two biases summed), num_layers stacked, + skip."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.w_ih = [mx.zeros((dim, 4 * dim)) for _ in range(layers)]
        self.w_hh = [mx.zeros((dim, 4 * dim)) for _ in range(layers)]
        self.b = [mx.zeros((4 * dim,)) for _ in range(layers)]

    def __call__(self, x):
        y = x
        for w_ih, w_hh, b in zip(self.w_ih, self.w_hh, self.b):
            y = self._layer(y, w_ih, w_hh, b)
        return y + x

    @staticmethod
    def _layer(x, w_ih, w_hh, b):
        bsz, t, d = x.shape
        xs = (x @ w_ih + b).astype(mx.float32)
        w_hh = w_hh.astype(mx.float32)
        h = mx.zeros((bsz, d), mx.float32)
        c = mx.zeros((bsz, d), mx.float32)
        out = []
        for i in range(t):
            z = xs[:, i] + h @ w_hh
            ig, fg, gg, og = mx.split(z, 4, axis=-1)
            c = mx.sigmoid(fg) * c + mx.sigmoid(ig) * mx.tanh(gg)
            h = mx.sigmoid(og) * mx.tanh(c)
            out.append(h)
            if i % 64 == 63:
                mx.eval(h, c)  # bounds the lazy graph of a long sequence
        return mx.stack(out, axis=1).astype(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, dim: int, cfg: EncodecConfig, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.conv1 = Conv(dim, hidden, cfg.residual_kernel_size, dilation)
        self.conv2 = Conv(hidden, dim, 1)

    def __call__(self, x):
        return x + self.conv2(nn.elu(self.conv1(nn.elu(x))))


class EncodecDecoder(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.config = cfg
        self.codebooks = [mx.zeros((cfg.codebook_size, cfg.dim)) for _ in range(cfg.num_quantizers)]
        ch = cfg.num_filters * 2 ** len(cfg.upsampling_ratios)
        self.conv_in = Conv(cfg.hidden_size, ch, cfg.kernel_size)
        self.lstm = LSTM(ch, cfg.num_lstm_layers)
        self.ups, self.blocks = [], []
        for r in cfg.upsampling_ratios:
            self.ups.append(ConvTranspose(ch, ch // 2, r))
            ch //= 2
            self.blocks.append([ResBlock(ch, cfg, cfg.dilation_growth_rate ** j)
                                for j in range(cfg.num_residual_layers)])
        self.conv_out = Conv(ch, cfg.audio_channels, cfg.last_kernel_size)

    def embed(self, codes):
        """codes [B, Q, T] -> quantizer embeddings [B, T, D]."""
        e = self.codebooks[0][codes[:, 0]]
        for q in range(1, codes.shape[1]):
            e = e + self.codebooks[q][codes[:, q]]
        return e

    def __call__(self, codes, taps: dict | None = None):
        """codes [B, Q, T] -> waveform [B, T*hop, channels]; `taps` collects transformers'
        decoder.layers.N outputs (channels-last) for the intermediate goldens."""
        x = self.conv_in(self.embed(codes))
        if taps is not None:
            taps[0] = x
        x = self.lstm(x)
        n = 1
        if taps is not None:
            taps[1] = x
        for up, blocks in zip(self.ups, self.blocks):
            x = up(nn.elu(x))
            n += 2
            if taps is not None:
                taps[n] = x
            for blk in blocks:
                x = blk(x)
                n += 1
                if taps is not None:
                    taps[n] = x
        x = self.conv_out(nn.elu(x))
        if taps is not None:
            taps[n + 2] = x
        return x


def sanitize(weights: dict, cfg: EncodecConfig) -> dict:
    """transformers `audio_encoder.*` keys (legacy weight_g/weight_v or parametrizations) -> ours."""
    w = drop_keys(weights, prefixes=("encoder.",), contains=(".cluster_size", ".embed_avg", ".inited"))
    for k in list(w):  # transformers 5 names of the same weight-norm pair
        if ".parametrizations.weight.original0" in k:
            w[k.replace(".parametrizations.weight.original0", ".weight_g")] = w.pop(k)
        elif ".parametrizations.weight.original1" in k:
            w[k.replace(".parametrizations.weight.original1", ".weight_v")] = w.pop(k)
    for k in [k for k in w if k.endswith(".weight_g")]:
        base = k[:-len(".weight_g")]
        w[base + ".weight"] = fold_weight_norm(w.pop(k), w.pop(base + ".weight_v")).astype(np.float32)
    out = {}
    nq = cfg.num_quantizers
    for q in range(nq):
        out[f"codebooks.{q}"] = w.pop(f"quantizer.layers.{q}.codebook.embed")
    nr = len(cfg.upsampling_ratios)
    index = {0: "conv_in", len(cfg.upsampling_ratios) * (2 + cfg.num_residual_layers) + 3: "conv_out"}
    n = 2
    for i in range(nr):
        index[n + 1] = f"ups.{i}"
        for j in range(cfg.num_residual_layers):
            index[n + 2 + j] = f"blocks.{i}.{j}"
        n += 2 + cfg.num_residual_layers
    lstm_prefix = "decoder.layers.1.lstm."
    for k, v in w.items():
        if k.startswith(lstm_prefix):
            name, _, layer = k[len(lstm_prefix):].rpartition("_l")
            if name in ("weight_ih", "weight_hh"):
                out[f"lstm.{'w_ih' if name == 'weight_ih' else 'w_hh'}.{layer}"] = v.T
            else:
                key = f"lstm.b.{layer}"
                out[key] = out.get(key, 0) + v
            continue
        parts = k.split(".")  # decoder.layers.N.conv.weight | decoder.layers.N.block.M.conv.weight
        if parts[0] != "decoder" or parts[1] != "layers" or int(parts[2]) not in index:
            raise KeyError(f"unexpected EnCodec key {k}")
        mod = index[int(parts[2])]
        if parts[3] == "block":
            mod += ".conv1" if parts[4] == "1" else ".conv2"
        leaf = parts[-1]
        if mod.startswith("ups.") and leaf == "weight":
            cin, cout, kk = v.shape  # [in, out, 2r] -> [in, (tap, out)]
            v = v.transpose(0, 2, 1).reshape(cin, kk * cout)
        elif leaf == "weight":
            v = v.transpose(0, 2, 1)  # Conv1d [out, in, k] -> [out, k, in]
        out[f"{mod}.{leaf}"] = v
    return out


def load(root: str | Path, cfg: MusicgenConfig, dtype) -> EncodecDecoder:
    a = cfg.audio
    if a.use_causal_conv or a.use_conv_shortcut or a.norm_type != "weight_norm" or a.pad_mode != "reflect":
        raise ValueError("only MusicGen's EnCodec (non-causal, weight norm, reflect padding, identity "
                         "shortcuts) is supported")
    w = sanitize(load_weights(root, "audio_encoder."), a)
    return load_strict(EncodecDecoder(a), w, dtype, f"{root} (EnCodec decoder)")

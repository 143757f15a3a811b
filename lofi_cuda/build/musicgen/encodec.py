"""The `mg_encodec_decode` graph: EnCodec 32 kHz's decoder as MusicGen calls it.

`codes [B,Q,T] int64 -> (audio [B,C,T*hop], embeddings [B,D,T], tap.N [B,ch,t])`: the residual
quantizer's lookup (codebook embeddings summed) then SEANet: conv(k7) -> LSTM stack + skip ->
per ratio r [ELU, ConvTranspose(k 2r, stride r), residual blocks] -> ELU -> conv(k7). `tap.N` is
transformers' decoder.layers.N output (for the intermediate goldens; ask only for what you need).

Non-causal convs reflect-pad left = total - total//2, right = total//2, zero-extending first when
the signal is shorter than the pad (torch's _pad1d); transposed convs drop the same split of
kernel - stride (ConvTranspose `pads`). Weight norm is folded as the weights are written.
Channels-first throughout; everything runs in the graph's dtype except the LSTM (fp32).
"""

from __future__ import annotations

import numpy as np

from lofi.musicgen.configs import MusicgenConfig

from lofi_cuda.build.graph import F32, I64, Graph, Value
from lofi_cuda.build.musicgen.weights import PrefixWeights
from lofi_cuda.build.weights import fold_weight_norm


class Builder:
    def __init__(self, g: Graph, w: PrefixWeights, cfg: MusicgenConfig):
        self.g, self.w, self.a = g, w, cfg.audio

    def weight(self, key: str) -> np.ndarray:
        for g_name, v_name in ((".weight_g", ".weight_v"),
                               (".parametrizations.weight.original0", ".parametrizations.weight.original1")):
            if key + g_name in self.w:
                return fold_weight_norm(self.w.get(key + g_name), self.w.get(key + v_name))
        return self.w.get(key + ".weight")

    def reflect_pad(self, x: Value, left: int, right: int) -> Value:
        g = self.g
        if not left and not right:
            return x
        # zero-extend a signal no longer than the pad, reflect, then drop the extension
        n = g.shape(x, 2, 3)
        extra = g.op("Max", g.ints([0]), g.ints([max(left, right) + 1]) - n)
        zeros = g.ints([0, 0, 0, 0, 0])
        x = g.op("Pad", x, g.concat([zeros, extra], 0), mode="constant")
        y = g.op("Pad", x, g.ints([0, 0, left, 0, 0, right]), mode="reflect")
        end = g.shape(y, 2, 3) - extra
        return g.op("Slice", y, g.ints([0]), end, g.ints([2]))

    def conv(self, x: Value, key: str, dilation: int = 1) -> Value:
        g = self.g
        w = self.weight(key)
        total = (w.shape[-1] - 1) * dilation
        x = self.reflect_pad(x, total - total // 2, total // 2)
        return g.op("Conv", x, g.param(w, name=key + ".weight"),
                    g.param(self.w.get(key + ".bias"), name=key + ".bias"),
                    dilations=[dilation], kernel_shape=[w.shape[-1]])

    def conv_transpose(self, x: Value, key: str, stride: int) -> Value:
        g = self.g
        w = self.weight(key)                                    # [in, out, k]
        total = w.shape[-1] - stride
        right = total // 2
        return g.op("ConvTranspose", x, g.param(w, name=key + ".weight"),
                    g.param(self.w.get(key + ".bias"), name=key + ".bias"),
                    strides=[stride], kernel_shape=[w.shape[-1]], pads=[total - right, right])

    def lstm(self, x: Value, key: str) -> Value:
        """torch.nn.LSTM stack (gates i,f,g,o) as ONNX LSTM ops (gates i,o,f,c), + skip."""
        g = self.g
        y = g.cast(x, F32).permute(2, 0, 1)                      # [T, B, C]
        order = [0, 3, 1, 2]
        for layer in range(self.a.num_lstm_layers):
            def gates(name):
                t = np.split(self.w.get(f"{key}.{name}_l{layer}"), 4, axis=0)
                return np.concatenate([t[i] for i in order])[None]
            wi, wh = gates("weight_ih"), gates("weight_hh")
            bias = np.concatenate([gates("bias_ih"), gates("bias_hh")], axis=1)
            hidden = wi.shape[1] // 4
            out = g.op("LSTM", y, g.param(wi, dtype=F32, name=f"lstm.W{layer}"),
                       g.param(wh, dtype=F32, name=f"lstm.R{layer}"),
                       g.param(bias, dtype=F32, name=f"lstm.B{layer}"), hidden_size=hidden, outputs=3)[0]
            y = g.op("Squeeze", out, g.ints([1]))                # [T, B, C]
        return g.cast(y.permute(1, 2, 0) + g.cast(x, F32), x.dtype)

    def embed(self, codes: Value) -> Value:
        g, a = self.g, self.a
        q, n = a.num_quantizers, a.codebook_size
        keys = [f"quantizer.layers.{i}.codebook.embed" for i in range(q)]
        table = g.param((self.w.get(k, (n, a.dim)) for k in keys), (q * n, a.dim), dtype=F32,
                        name="codebooks")
        flat = codes + g.const(np.arange(q, dtype=np.int64).reshape(1, q, 1) * n, I64)
        e = g.op("ReduceSum", g.op("Gather", table, flat, axis=0), g.ints([1]), keepdims=0)  # [B,T,D]
        return e.permute(0, 2, 1)

    def decoder(self, e: Value, taps: dict) -> Value:
        g, a = self.g, self.a
        x = self.conv(g.cast(e, g.dtype), "decoder.layers.0.conv")
        taps[0] = x
        x = self.lstm(x, "decoder.layers.1.lstm")
        taps[1] = x
        n = 1
        for r in a.upsampling_ratios:
            x = self.conv_transpose(g.op("Elu", x, alpha=1.0), f"decoder.layers.{n + 2}.conv", r)
            n += 2
            taps[n] = x
            for j in range(a.num_residual_layers):
                n += 1
                key = f"decoder.layers.{n}.block"
                y = self.conv(g.op("Elu", x, alpha=1.0), f"{key}.1.conv", a.dilation_growth_rate ** j)
                x = x + self.conv(g.op("Elu", y, alpha=1.0), f"{key}.3.conv")
                taps[n] = x
        x = self.conv(g.op("Elu", x, alpha=1.0), f"decoder.layers.{n + 2}.conv")
        taps[n + 2] = x
        return x


def build(root, folder, dtype, cfg: MusicgenConfig) -> dict:
    a = cfg.audio
    if a.use_causal_conv or a.use_conv_shortcut or a.norm_type != "weight_norm" or a.pad_mode != "reflect":
        raise ValueError("only MusicGen's EnCodec (non-causal, weight norm, reflect padding, identity "
                         "shortcuts) is supported")
    w = PrefixWeights(root, "audio_encoder.", drop_prefixes=("encoder.",),
                      drop_parts=(".cluster_size", ".embed_avg", ".inited"))
    g = Graph("mg_encodec_decode", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        codes = g.input("codes", I64, ["B", a.num_quantizers, "T"])
        e = b.embed(codes)
        g.output(e, "embeddings", ["B", a.dim, "T"])
        taps: dict = {}
        audio = b.decoder(e, taps)
        g.output(audio.float(), "audio", ["B", a.audio_channels, "N"])
        for n, t in sorted(taps.items()):
            g.output(t.float(), f"tap.{n}", ["B", None, None])
        w.finish()
        return [("mg_encodec_decode", g.save("EnCodec decoder (quantizer lookup + SEANet) for MusicGen"))]
    except BaseException:
        g.abandon()
        raise

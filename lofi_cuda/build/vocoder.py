"""The vocoder graph (ADaMoSHiFiGANV1, spec §9): mel [B, 128, F] fp32 -> wave [B, 512·F] fp32.

Mirrors convert/torch_port/vocoder.py op for op. Weight norm is folded as each weight is
written. Half precision: the residual streams and norm statistics stay fp32, each conv or
linear reads its input in the run dtype and adds its bias in fp32.
"""

from __future__ import annotations

from lofi.acestep.configs import VocoderConfig
from lofi.errors import MODEL_LOAD_FAILED, LofiError

from lofi_cuda.build.graph import F32, Graph, Value
from lofi_cuda.build.weights import Weights, fold_weight_norm

_WN = ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


class Builder:
    def __init__(self, g: Graph, w: Weights, cfg: VocoderConfig):
        self.g, self.w, self.cfg = g, w, cfg

    def weight(self, base: str):
        """A conv weight: plain, or weight-normed (folded here)."""
        if base + ".weight" in self.w:
            return self.w.get(base + ".weight")
        for gs, vs in _WN:
            if base + gs in self.w:
                return fold_weight_norm(self.w.get(base + gs), self.w.get(base + vs))
        return self.w.get(base + ".weight")  # reports the missing key

    def bias(self, base: str, n: int) -> Value:
        return self.g.param(self.w.get(base + ".bias", (n,)), name=base + ".bias").float()

    def conv(self, x: Value, base: str, cin: int, cout: int, kernel: int, dilation=1, groups=1,
             padding=None, transpose_stride=0) -> Value:
        g = self.g
        arr = self.weight(base)
        shape = (cin, cout, kernel) if transpose_stride else (cout, cin // groups, kernel)
        if arr.shape != shape:
            raise_shape(self.w, base, arr.shape, shape)
        w = g.param(arr, name=base + ".weight")
        x = g.cast(x, w.dtype)
        if transpose_stride:
            p = (kernel - transpose_stride) // 2
            y = g.op("ConvTranspose", x, w, strides=[transpose_stride], pads=[p, p], kernel_shape=[kernel])
        else:
            p = dilation * (kernel - 1) // 2 if padding is None else padding
            y = g.op("Conv", x, w, pads=[p, p], dilations=[dilation], group=groups, kernel_shape=[kernel])
        return y.float() + g.unsqueeze(self.bias(base, cout), [1])

    def layer_norm(self, x: Value, base: str, dims: int, eps: float = 1e-6) -> Value:
        """LayerNorm over channels (axis 1), fp32 throughout."""
        g = self.g
        wt = g.unsqueeze(g.param(self.w.get(base + ".weight", (dims,)), name=base + ".weight").float(), [1])
        b = g.unsqueeze(g.param(self.w.get(base + ".bias", (dims,)), name=base + ".bias").float(), [1])
        xf = x.float()
        d = xf - g.mean(xf, [1])
        y = d * g.rsqrt(g.mean(d * d, [1]) + eps)
        return y * wt + b

    def pointwise(self, x: Value, base: str, cin: int, cout: int) -> Value:
        g = self.g
        arr = self.w.get(base + ".weight")
        if arr.ndim == 3:
            arr = arr[:, :, 0]                                      # a 1x1 conv
        if arr.shape != (cout, cin):
            raise_shape(self.w, base, arr.shape, (cout, cin))
        w = g.param(arr, name=base + ".weight")
        y = g.op("MatMul", w, g.cast(x, w.dtype))                    # [B, cout, L]
        return y.float() + g.unsqueeze(self.bias(base, cout), [1])

    def convnext(self, x: Value, base: str, dims: int, kernel: int) -> Value:
        g = self.g
        h = self.conv(x, base + ".dwconv", dims, dims, kernel, groups=dims)
        h = self.layer_norm(h, base + ".norm", dims)
        h = g.gelu(self.pointwise(h, base + ".pwconv1", dims, 4 * dims))
        h = self.pointwise(h, base + ".pwconv2", 4 * dims, dims)
        gamma = g.unsqueeze(g.param(self.w.get(base + ".gamma", (dims,)), name=base + ".gamma").float(), [1])
        return x + gamma * h

    def backbone(self, x: Value) -> Value:
        g, cfg = self.g, self.cfg
        d, k = cfg.dims, cfg.kernel_sizes[0]
        for i in range(len(d)):
            base = f"backbone.channel_layers.{i}"
            if i == 0:
                pad = (k - 1) // 2
                x = g.op("Pad", x, g.ints([0, 0, pad, 0, 0, pad]), mode="edge")
                x = self.conv(x, base + ".0", cfg.input_channels, d[0], k, padding=0)
                x = self.layer_norm(x, base + ".1", d[0])
            else:
                x = self.layer_norm(x, base + ".0", d[i - 1])
                x = self.pointwise(x, base + ".1", d[i - 1], d[i])
            for j in range(cfg.depths[i]):
                x = self.convnext(x, f"backbone.stages.{i}.{j}", d[i], k)
        return self.layer_norm(x, "backbone.norm", d[-1])

    def head(self, x: Value) -> Value:
        g, cfg = self.g, self.cfg
        ch = cfg.upsample_initial_channel
        x = self.conv(x, "head.conv_pre", cfg.num_mels, ch, cfg.pre_conv_kernel_size)
        n = len(cfg.resblock_kernel_sizes)
        for u, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            cin, cout = ch // 2 ** u, ch // 2 ** (u + 1)
            x = self.conv(g.silu(x), f"head.ups.{u}", cin, cout, kernel, transpose_stride=rate)
            acc = None
            for r, (k, ds) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
                y = self.resblock(x, f"head.resblocks.{u * n + r}", cout, k, ds)
                acc = y if acc is None else acc + y
            x = acc / float(n)
        x = self.conv(g.silu(x), "head.conv_post", ch // 2 ** len(cfg.upsample_rates), 1,
                      cfg.post_conv_kernel_size)
        return g.op("Tanh", x)

    def resblock(self, x: Value, base: str, dims: int, kernel: int, dilations) -> Value:
        g = self.g
        for i, d in enumerate(dilations):
            h = self.conv(g.silu(x), f"{base}.convs1.{i}", dims, dims, kernel, dilation=d)
            x = x + self.conv(g.silu(h), f"{base}.convs2.{i}", dims, dims, kernel)
        return x


def raise_shape(w: Weights, base, have, want):
    raise LofiError(MODEL_LOAD_FAILED, f"{w.folder}: weight {base} has shape {list(have)}, "
                    f"the network expects {list(want)}")


def build(root, folder, dtype) -> dict:
    w = Weights(root, "vocoder", drop_prefixes=("mel_transform.",))
    cfg = VocoderConfig.from_dict(w.config)
    g = Graph("vocoder", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        mel = g.input("mel", F32, ["B", cfg.input_channels, "F"])
        y = b.head(b.backbone(mel))
        g.output(g.reshape(y.float(), [0, -1]), "wave", ["B", "S"])
        w.finish()
        return g.save("ACE-Step v1 vocoder: log-mel -> 44.1 kHz wave")
    except BaseException:
        g.abandon()
        raise

"""The DCAE graphs (diffusers AutoencoderDC as ACE-Step v1 uses it, spec §8), NCHW throughout:
* `dcae_decode`: DiT latents [B, 8, 16, T] -> log-mel [B, 2, 128, 8T];
* `dcae_encode`: log-mel [B, 2, 128, F] -> DiT latents [B, 8, 16, F/8].

Mirrors convert/torch_port/dcae.py, including ACE-Step's latent and mel constants. Half
precision keeps the fp32 islands: RMS-norm statistics and the whole multiscale linear attention.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from lofi.acestep.configs import (DCAE_ATTN_EPS, DCAE_MEL_MAX, DCAE_MEL_MIN, DCAE_NORM_EPS, DCAE_PARTS,
                                  DCAE_SCALE_FACTOR, DCAE_SHIFT_FACTOR, DCAEConfig)

from lofi.acestep.tiling import dcae_attention_stages, dcae_up_factor
from lofi_cuda.build.graph import F32, I64, Graph, Value
from lofi_cuda.build.weights import Weights


# The decoder's window tables (int64 inputs made by the engine, lofi_cuda.engine.dcae_tables):
# name, columns.
DECODE_TABLES = (("sum_windows", 4), ("attn_windows", 6), ("up_windows", 4))


class Builder:
    def __init__(self, g: Graph, w: Weights, cfg: DCAEConfig, part: str):
        self.g, self.w, self.cfg, self.part = g, w, cfg, part
        self._params: dict[str, Value] = {}

    def p(self, key: str, shape=None, transpose: bool = False) -> Value:
        if key not in self._params:  # a windowed block reads its weights in two loops
            arr = self.w.get(f"{self.part}.{key}", shape)
            self._params[key] = self.g.param(arr.T if transpose else arr, name=key)
        return self._params[key]

    # -- layers ----------------------------------------------------------------------------------
    def conv(self, x: Value, key: str, cin: int, cout: int, k: int, stride=1, groups=1, bias=True) -> Value:
        w = self.p(key + ".weight", (cout, cin // groups, k, k))
        b = self.p(key + ".bias", (cout,)) if bias else None
        pad = k // 2
        return self.g.op("Conv", self.g.cast(x, w.dtype), w, b, pads=[pad] * 4, strides=[stride, stride],
                         group=groups, kernel_shape=[k, k])

    def rms_norm(self, x: Value, key: str, dims: int) -> Value:
        g = self.g
        xf = x.float()
        y = g.cast(xf * g.rsqrt(g.mean(xf * xf, [1]) + DCAE_NORM_EPS), x.dtype)
        wt = g.reshape(self.p(key + ".weight", (dims,)), [dims, 1, 1])
        b = g.reshape(self.p(key + ".bias", (dims,)), [dims, 1, 1])
        return g.cast(y, wt.dtype) * wt + b

    def linear_nhwc(self, x: Value, key: str, cin: int, cout: int) -> Value:
        """nn.Linear (no bias) over the channels of an NHWC tensor."""
        w = self.p(key + ".weight", (cout, cin), transpose=True)
        return self.g.op("MatMul", self.g.cast(x, w.dtype), w)

    def repeat_channels(self, x: Value, channels: int, n: int) -> Value:
        if n == 1:
            return x
        return self.g.op("Gather", x, self.g.ints(np.arange(channels * n) // n), axis=1)

    def group_mean(self, x: Value, channels: int, size: int) -> Value:
        if size == 1:
            return x
        g = self.g
        shape5 = g.concat([g.shape(x, 0, 1), [channels // size, size], g.shape(x, 2)], 0)
        return g.op("ReduceMean", g.reshape(x, shape5), g.ints([2]), keepdims=0)

    def resblock(self, x: Value, key: str, c: int) -> Value:
        h = self.conv(self.g.silu(self.conv(x, key + ".conv1", c, c, 3)), key + ".conv2", c, c, 3, bias=False)
        return x + self.rms_norm(h, key + ".norm", c)

    def attn_qkv(self, x: Value, key: str, c: int, kernels, keep=None):
        """ReLU'd Q, K and V [B, G, d, N] in fp32 (N = H*W); `keep` = ([1] start, [1] end) crops
        frames after the multiscale convs (a window's halo is only there to feed them)."""
        g, d = self.g, self.cfg.attention_head_dim
        heads = c // d
        xl = x.permute(0, 2, 3, 1)
        qkv = g.concat([self.linear_nhwc(xl, f"{key}.to_{n}", c, c) for n in "qkv"], -1).permute(0, 3, 1, 2)
        parts = [qkv]
        for i, k in enumerate(kernels):
            base = f"{key}.to_qkv_multiscale.{i}"
            w_in = self.p(base + ".proj_in.weight", (3 * c, 1, k, k))
            h = g.op("Conv", qkv, w_in, pads=[k // 2] * 4, group=3 * c, kernel_shape=[k, k])
            w_out = self.p(base + ".proj_out.weight", (3 * c, d, 1, 1))
            parts.append(g.op("Conv", h, w_out, group=3 * heads, kernel_shape=[1, 1]))
        z = g.concat(parts, 1).float()
        groups = 3 * c * len(parts) // (3 * d)
        if keep is not None:
            z = g.slice_at(z, keep[0], keep[1], 3)
        z = g.reshape(z, [0, groups, 3 * d, -1])                            # [B, G, 3d, N]
        q, k, v = (g.slice(z, i * d, (i + 1) * d, 2) for i in range(3))
        return g.relu(q), g.relu(k), v

    def attn_sums(self, k: Value, v: Value) -> Value:
        """[B, G, d+1, d]: sum_n v_n k_n^T, and a last row sum_n k_n (a ones row on V), which
        is the normaliser: the attention is (sums @ q) split into numerator and denominator."""
        g = self.g
        v = g.op("Pad", v, g.ints([0, 0, 0, 0, 0, 0, 1, 0]), g.const(1.0, v.dtype))
        return v @ k.permute(0, 1, 3, 2)

    def attn_out(self, x: Value, q: Value, vk: Value, key: str, c: int, kernels) -> Value:
        g, d = self.g, self.cfg.attention_head_dim
        o = vk @ q                                                          # [B, G, d+1, N]
        o = g.slice(o, 0, d, 2) / (g.slice(o, d, d + 1, 2) + DCAE_ATTN_EPS)
        o = g.cast(g.reshape(o, g.concat([g.shape(x, 0, 1), [-1], g.shape(x, 2)], 0)), x.dtype)
        out = self.linear_nhwc(o.permute(0, 2, 3, 1), f"{key}.to_out", c * (1 + len(kernels)), c)
        return x + self.rms_norm(out.permute(0, 3, 1, 2), f"{key}.norm_out", c)

    def attention(self, x: Value, key: str, c: int, kernels) -> Value:
        q, k, v = self.attn_qkv(x, key, c, kernels)
        return self.attn_out(x, q, self.attn_sums(k, v), key, c, kernels)

    def glumbconv(self, x: Value, key: str, c: int) -> Value:
        g = self.g
        hidden = 4 * c
        h = self.conv(g.silu(self.conv(x, key + ".conv_inverted", c, 2 * hidden, 1)), key + ".conv_depth",
                      2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        a, gate = g.split(h, 2, 1)
        h = self.conv(a * g.silu(gate), key + ".conv_point", hidden, c, 1, bias=False)
        return x + self.rms_norm(h, key + ".norm", c)

    def block(self, x: Value, kind: str, key: str, c: int, kernels) -> Value:
        if kind == "ResBlock":
            return self.resblock(x, key, c)
        return self.glumbconv(self.attention(x, key + ".attn", c, kernels), key + ".conv_out", c)

    # -- the two halves --------------------------------------------------------------------------
    def up_block(self, h: Value, i: int) -> Value:
        """UpBlock of stage i: nearest x2 + conv, plus channel repeat then pixel shuffle."""
        g, ch = self.g, self.cfg.decoder_block_out_channels
        cin, cout = ch[i + 1], ch[i]
        up = g.op("Resize", h, None, g.const([1.0, 1.0, 2.0, 2.0]), mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        short = g.op("DepthToSpace", self.repeat_channels(h, cin, cout * 4 // cin), blocksize=2, mode="CRD")
        return self.conv(up, f"up_blocks.{i}.0.conv", cin, cout, 3) + short

    def up(self, h: Value) -> Value:
        """The convolution-only stages, norm_out and conv_out: local in time, so they run on
        windows with an exact halo (lofi.acestep.tiling.dcae_up_halo)."""
        cfg, ch = self.cfg, self.cfg.decoder_block_out_channels
        n = len(ch)
        for i in reversed(range(n - dcae_attention_stages(cfg))):
            j = 0
            if i < n - 1:
                h, j = self.up_block(h, i), 1
            for m in range(cfg.decoder_layers_per_block[i]):
                h = self.resblock(h, f"up_blocks.{i}.{j + m}", ch[i])
        h = self.g.relu(self.rms_norm(h, "norm_out", ch[0]))
        return self.conv(h, "conv_out", ch[0], cfg.in_channels, 3)

    def windowed_attention_block(self, h: Value, key: str, c: int, kernels, sums_rows: Value,
                                 rows: Value) -> Value:
        """An EfficientViT block over time windows, in two loops: the attention's sums over
        `sums_rows` (a, b, s, e: run on frames [a, b), keep [s, e)), then per row of `rows`
        (lo, hi, a, b, s, e) the attention's output for [a, b) from input frames [lo, hi), the
        block's GLUMBConv on it, frames [s, e) kept and appended. Equal to the whole block up to
        the order of the sums; memory is one window's."""
        g = self.g
        akey = key + ".attn"

        def add_sums(row, vk):
            a, b, s, e = g.columns(row, 4)
            _, k, v = self.attn_qkv(g.slice_at(h, a, b, 3), akey, c, kernels, (s - a, e - a))
            return [vk + self.attn_sums(k, v)]

        d = self.cfg.attention_head_dim
        groups = c * (1 + len(kernels)) // d
        zero = g.op("ConstantOfShape", g.concat([g.shape(h, 0, 1), [groups, d + 1, d]], 0),
                    value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]), dtype=F32)
        vk = g.loop_rows(sums_rows, [zero], add_sums)[0]

        def add_window(row, acc):
            lo, hi, a, b, s, e = g.columns(row, 6)
            q, _, _ = self.attn_qkv(g.slice_at(h, lo, hi, 3), akey, c, kernels, (a - lo, b - lo))
            y = self.attn_out(g.slice_at(h, a, b, 3), q, vk, akey, c, kernels)
            y = self.glumbconv(y, key + ".conv_out", c)
            return [g.concat([acc, g.slice_at(y, s - a, e - a, 3)], 3)]

        return g.loop_rows(rows, [g.slice(h, 0, 0, 3)], add_window)[0]

    def decoder(self, z: Value, sums_rows: Value, rows: Value, up_rows: Value) -> Value:
        """The decoder in time windows (tables from the engine, see lofi_cuda.engine): conv_in
        whole, the attention stage block by block (`windowed_attention_block`), then the
        convolution stages end to end per window of `up_rows` (a, b, s, e at the latent rate)."""
        g, cfg = self.g, self.cfg
        ch = cfg.decoder_block_out_channels
        n = len(ch)
        if dcae_attention_stages(cfg) != 1 or cfg.decoder_block_types[n - 1] == "ResBlock":
            raise ValueError("the ONNX DCAE decoder expects global attention in its lowest-resolution "
                             f"stage only (ACE-Step's layout), got {list(cfg.decoder_block_types)}")
        h = self.conv(z, "conv_in", cfg.latent_channels, ch[-1], 3) + \
            self.repeat_channels(z, cfg.latent_channels, ch[-1] // cfg.latent_channels)
        for m in range(cfg.decoder_layers_per_block[n - 1]):
            h = self.windowed_attention_block(h, f"up_blocks.{n - 1}.{m}", ch[-1],
                                              cfg.decoder_qkv_multiscales[n - 1], sums_rows, rows)
        f = dcae_up_factor(cfg)

        def add_tile(row, acc):
            a, b, s, e = g.columns(row, 4)
            y = self.up(g.slice_at(h, a, b, 3))
            return [g.concat([acc, g.slice_at(y, (s - a) * f, (e - a) * f, 3)], 3)]

        init = g.op("ConstantOfShape", g.concat([g.shape(z, 0, 1), [cfg.in_channels, 128, 0]], 0),
                    value=helper.make_tensor("zero", g.dtype, [1], [0.0]), dtype=g.dtype)
        return g.loop_rows(up_rows, [init], add_tile)[0]

    def encoder(self, x: Value) -> Value:
        g, cfg = self.g, self.cfg
        ch = cfg.encoder_block_out_channels
        n = len(ch)
        h = self.conv(x, "conv_in", cfg.in_channels, ch[0], 3)
        for i in range(n):
            layers = cfg.encoder_layers_per_block[i]
            for m in range(layers):
                h = self.block(h, cfg.encoder_block_types[i], f"down_blocks.{i}.{m}", ch[i],
                               cfg.encoder_qkv_multiscales[i])
            if i < n - 1:  # DownBlock: strided conv, plus pixel unshuffle then group mean
                cin, cout = ch[i], ch[i + 1]
                s2d = g.op("SpaceToDepth", h, blocksize=2)        # channel (2a+b)*C + c
                j = np.arange(4 * cin)
                unshuf = g.op("Gather", s2d, g.ints((j % 4) * cin + j // 4), axis=1)  # -> 4c + 2a + b
                h = self.conv(h, f"down_blocks.{i}.{layers}.conv", cin, cout, 3, stride=2) + \
                    self.group_mean(unshuf, 4 * cin, cin * 4 // cout)
        return self.conv(h, "conv_out", ch[-1], cfg.latent_channels, 3) + \
            self.group_mean(h, ch[-1], ch[-1] // cfg.latent_channels)


def build(root, folder, dtype, part: str) -> dict:
    other = [p for p in DCAE_PARTS if p != part]
    w = Weights(root, "dcae", drop_prefixes=tuple(f"{p}." for p in other))
    cfg = DCAEConfig.from_dict(w.config)
    name = "dcae_decode" if part == "decoder" else "dcae_encode"
    g = Graph(name, folder, dtype)
    try:
        b = Builder(g, w, cfg, part)
        if part == "decoder":
            lat = g.input("latents", F32, ["B", cfg.latent_channels, 16, "T"])
            tables = [g.input(name, I64, [f"K{name}", cols]) for name, cols in DECODE_TABLES]
            m = b.decoder(g.cast(lat / DCAE_SCALE_FACTOR + DCAE_SHIFT_FACTOR, dtype), *tables).float()
            g.output((m * 0.5 + 0.5) * (DCAE_MEL_MAX - DCAE_MEL_MIN) + DCAE_MEL_MIN, "mel",
                     ["B", cfg.in_channels, 128, "F"])
        else:
            mel = g.input("mel", F32, ["B", cfg.in_channels, 128, "F"])
            x = ((mel - DCAE_MEL_MIN) / (DCAE_MEL_MAX - DCAE_MEL_MIN) - 0.5) / 0.5
            z = b.encoder(g.cast(x, dtype)).float()
            g.output((z - DCAE_SHIFT_FACTOR) * DCAE_SCALE_FACTOR, "latents", ["B", cfg.latent_channels, 16, "T"])
        w.finish()
        return g.save(f"ACE-Step v1 music DCAE {part}")
    except BaseException:
        g.abandon()
        raise

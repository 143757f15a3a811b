"""The Conformer lyric encoder of ACE-Step v1 (spec §3.3-3.4), part of the dit_encode graph.

Mirrors convert/torch_port/lyric_encoder.py: pre-norm blocks of Transformer-XL relative-position
attention (the rel-shift as a gather through the `rel_index` input) and a SiLU feed-forward.
Norm statistics, scores and softmax are fp32.
"""

from __future__ import annotations

import math

from lofi.acestep.configs import LYRIC_PREFIX, LyricEncoderConfig

from lofi_cuda.build.graph import BOOL, Graph, Value
from lofi_cuda.build.weights import Weights


class LyricEncoder:
    def __init__(self, g: Graph, w: Weights, cfg: LyricEncoderConfig, prefix: str = LYRIC_PREFIX):
        self.g, self.w, self.cfg, self.prefix = g, w, cfg, prefix

    def p(self, key: str, shape, transpose: bool = False) -> Value:
        arr = self.w.get(self.prefix + key, shape)
        return self.g.param(arr.T if transpose else arr, name=self.prefix + key)

    def linear(self, x: Value, key: str, cin: int, cout: int, bias: bool = True) -> Value:
        w = self.p(key + ".weight", (cout, cin), transpose=True)
        return self.g.linear(x, w, self.p(key + ".bias", (cout,)) if bias else None)

    def layer_norm(self, x: Value, key: str) -> Value:
        g, c = self.g, self.cfg
        xf = x.float()
        d = xf - g.mean(xf, [-1])
        y = g.cast(d * g.rsqrt(g.mean(d * d, [-1]) + c.eps), x.dtype)
        return y * self.p(key + ".weight", (c.width,)) + self.p(key + ".bias", (c.width,))

    def attention(self, x: Value, key: str, pe: Value, rel_index: Value, keep: Value, q_scale: Value) -> Value:
        g, c = self.g, self.cfg
        H, d, W = c.heads, c.head_dim, c.width
        q = g.cast(self.linear(x, key + ".linear_q", W, W).float() * q_scale, x.dtype)
        q = g.reshape(q, [0, 0, H, d])
        k = g.reshape(self.linear(x, key + ".linear_k", W, W), [0, 0, H, d]).permute(0, 2, 1, 3)
        v = g.reshape(self.linear(x, key + ".linear_v", W, W), [0, 0, H, d]).permute(0, 2, 1, 3)
        p = g.reshape(self.linear(pe, key + ".linear_pos", W, W, bias=False), [-1, H, d]).permute(1, 0, 2)
        qu = (q + self.p(key + ".pos_bias_u", (H, d))).permute(0, 2, 1, 3)
        qv = (q + self.p(key + ".pos_bias_v", (H, d))).permute(0, 2, 1, 3)
        ac = qu.float() @ k.float().permute(0, 1, 3, 2)                    # [B, H, N, N]
        bd_all = qv.float() @ p.float().permute(0, 2, 1)                   # [B, H, N, 2N-1]
        # Transformer-XL rel-shift as a gather: column (N-1)-(i-j) holds relative position i-j
        index = g.op("Expand", rel_index, g.concat([g.shape(bd_all, 0, 2), g.shape(rel_index)], 0))
        bd = g.op("GatherElements", bd_all, index, axis=-1)
        s = (ac + bd) / math.sqrt(d)
        keep4 = g.unsqueeze(keep, [1, 2])
        s = g.where(keep4, s, float("-inf"))
        # all-masked rows (empty lyrics) are NaN after softmax; the reference sets them to 0
        attn = g.cast(g.where(keep4, g.softmax(s), 0.0), v.dtype)
        o = g.reshape((attn @ v).permute(0, 2, 1, 3), [0, 0, H * d])
        return self.linear(o, key + ".linear_out", W, W)

    def __call__(self, x: Value, mask: Value, pe: Value, rel_index: Value, q_scale: Value) -> Value:
        g, c = self.g, self.cfg
        x = self.layer_norm(self.linear(x, "embed.out.0", c.input_size, c.width), "embed.out.1")
        x = x * math.sqrt(c.width)
        pe = g.cast(pe, x.dtype)
        keep = g.op("Not", g.op("Equal", mask, g.ints(0), dtype=BOOL))
        for n in range(c.blocks):
            key = f"encoders.{n}"
            qs = g.op("Gather", q_scale, g.ints(n), axis=0)
            a = self.layer_norm(x, key + ".norm_mha")
            x = x + self.attention(a, key + ".self_attn", pe, rel_index, keep, qs)
            f = self.layer_norm(x, key + ".norm_ff")
            ff = self.linear(g.silu(self.linear(f, key + ".feed_forward.w_1", c.width, c.ff)),
                             key + ".feed_forward.w_2", c.ff, c.width)
            x = x + ff
        return self.layer_norm(x, "after_norm")

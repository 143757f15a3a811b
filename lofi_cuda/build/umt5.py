"""The text_encoder graph: UMT5 encoder (umt5-base, spec §2.2).

`(input_ids [B,N] int64, attention_mask [B,N] int64, buckets [N,N] int64, q_scale [layers] fp32)
-> last_hidden_state [B,N,d] fp32`, mirroring convert/torch_port/umt5.py: T5 RMS norm, no
1/sqrt(d), a relative-bias table per layer, gated tanh-GELU FFN. Half precision keeps the
residual stream, the gated product, `wo`, scores and softmax in fp32 (T5 overflows fp16 there).
The token table (the largest tensor, 0.8 GB in fp32) is written in row blocks.
"""

from __future__ import annotations

import math

import numpy as np

from lofi.acestep.configs import UMT5Config

from lofi_cuda.build.graph import F16, F32, I64, Graph, Value
from lofi_cuda.build.weights import Weights


class Builder:
    def __init__(self, g: Graph, w: Weights, cfg: UMT5Config):
        self.g, self.w, self.cfg = g, w, cfg

    def linear(self, x: Value, key: str, cin: int, cout: int, dtype=None) -> Value:
        w = self.g.param(self.w.get(key, (cout, cin)).T, dtype=dtype, name=key)
        return self.g.linear(x, w)

    def norm(self, x: Value, key: str) -> Value:
        g, d = self.g, self.cfg.d_model
        w = g.param(self.w.get(key, (d,)), name=key)
        xf = x.float()
        y = g.cast(xf * g.rsqrt(g.mean(xf * xf, [-1]) + self.cfg.layer_norm_epsilon), x.dtype)
        return g.cast(y, w.dtype) * w

    def attention(self, x: Value, key: str, buckets: Value, key_mask: Value, q_scale: Value) -> Value:
        g, c = self.g, self.cfg
        inner = c.num_heads * c.d_kv
        q = g.cast(self.linear(x, key + ".q.weight", c.d_model, inner).float() * q_scale, x.dtype)

        def heads(t):
            return g.reshape(t, [0, 0, c.num_heads, c.d_kv]).permute(0, 2, 1, 3)
        q, k = heads(q), heads(self.linear(x, key + ".k.weight", c.d_model, inner))
        v = heads(self.linear(x, key + ".v.weight", c.d_model, inner))
        table = g.param(self.w.get(key + ".relative_attention_bias.weight",
                                   (c.relative_attention_num_buckets, c.num_heads)), name=key + ".rel")
        bias = g.op("Gather", table, buckets, axis=0).float().permute(2, 0, 1)   # [H, N, N]
        s = q.float() @ k.float().permute(0, 1, 3, 2) + bias + key_mask
        p = g.cast(g.softmax(s), x.dtype)
        o = g.reshape((p @ v).permute(0, 2, 1, 3), [0, 0, -1])
        return self.linear(o, key + ".o.weight", inner, c.d_model)

    def ffn(self, x: Value, key: str) -> Value:
        g, c = self.g, self.cfg
        a = self.linear(x, key + ".wi_0.weight", c.d_model, c.d_ff).float()
        a = 0.5 * a * (1.0 + g.op("Tanh", math.sqrt(2.0 / math.pi) * (a + 0.044715 * a * a * a)))
        h = a * self.linear(x, key + ".wi_1.weight", c.d_model, c.d_ff).float()
        return self.linear(h, key + ".wo.weight", c.d_ff, c.d_model, dtype=F32)   # wo stays fp32

    def encoder(self, ids: Value, mask: Value, buckets: Value, q_scale: Value) -> Value:
        g, c = self.g, self.cfg
        neg = float(np.finfo(np.float16 if g.dtype == F16 else np.float32).min)
        key_mask = g.unsqueeze((1.0 - mask.float()) * neg, [1, 2])
        key = "shared.weight" if "shared.weight" in self.w else "encoder.embed_tokens.weight"
        shape, chunks = self.w.chunks(key, (c.vocab_size, c.d_model))
        table = g.param(chunks, shape, name="embed_tokens")
        h = g.op("Gather", table, ids, axis=0).float()                   # the fp32 residual stream
        for i in range(c.num_layers):
            base = f"encoder.block.{i}.layer"
            qs = g.op("Gather", q_scale, g.ints(i), axis=0)
            h = h + self.attention(self.norm(h, f"{base}.0.layer_norm.weight"), f"{base}.0.SelfAttention",
                                   buckets, key_mask, qs).float()
            h = h + self.ffn(self.norm(h, f"{base}.1.layer_norm.weight"), f"{base}.1.DenseReluDense").float()
        return self.norm(h, "encoder.final_layer_norm.weight").float()


def build(root, folder, dtype) -> dict:
    w = Weights(root, "text_encoder", drop_prefixes=("decoder.", "lm_head."))
    if "shared.weight" in w and "encoder.embed_tokens.weight" in w:
        w.ignored.add("encoder.embed_tokens.weight")   # the tied table, stored twice
    cfg = UMT5Config.from_dict(w.config)
    g = Graph("text_encoder", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        ids = g.input("input_ids", I64, ["B", "N"])
        mask = g.input("attention_mask", I64, ["B", "N"])
        buckets = g.input("buckets", I64, ["N", "N"])
        q_scale = g.input("q_scale", F32, [cfg.num_layers])
        g.output(b.encoder(ids, mask, buckets, q_scale), "last_hidden_state", ["B", "N", cfg.d_model])
        w.finish()
        return g.save("UMT5 encoder (umt5-base) for ACE-Step v1")
    except BaseException:
        g.abandon()
        raise

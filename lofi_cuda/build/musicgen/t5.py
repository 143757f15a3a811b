"""The `mg_text_encoder` graph: MusicGen's T5 encoder (t5-base) + enc_to_dec_proj.

`(input_ids [B,N] int64, attention_mask [B,N] int64, buckets [N,N] int64) ->
(last_hidden_state [B,N,Dt], states [B,N,H])`, states = projection * mask, so padded positions
(and the whole null text) are exactly 0, not the bias. T5: no 1/sqrt(d), one relative-bias table
(block 0's) for every block, RMS norm with fp32 statistics, ReLU FFN; fp32 residual stream.
"""

from __future__ import annotations

from lofi.musicgen.configs import MusicgenConfig

from lofi_cuda.build.graph import F32, I64, Graph, Value
from lofi_cuda.build.musicgen.weights import PrefixWeights

MASKED = -1e30  # finite: same softmax as transformers' finfo.min, never NaN


class Builder:
    def __init__(self, g: Graph, w: PrefixWeights, cfg: MusicgenConfig):
        self.g, self.w, self.t = g, w, cfg.text

    def linear(self, x: Value, key: str, cin: int, cout: int) -> Value:
        return self.g.linear(x, self.g.param(self.w.get(key, (cout, cin)).T, name=key))

    def norm(self, x: Value, key: str) -> Value:
        g, d = self.g, self.t.d_model
        w = g.param(self.w.get(key, (d,)), dtype=F32, name=key)
        xf = x.float()
        return xf * g.rsqrt(g.mean(xf * xf, [-1]) + self.t.layer_norm_epsilon) * w

    def attention(self, x: Value, key: str, bias: Value) -> Value:
        g, t = self.g, self.t
        inner = t.num_heads * t.d_kv

        def heads(name):
            y = self.linear(x, f"{key}.{name}.weight", t.d_model, inner)
            return g.reshape(y, [0, 0, t.num_heads, t.d_kv]).permute(0, 2, 1, 3)
        q, k, v = heads("q"), heads("k"), heads("v")
        p = g.softmax(q.float() @ k.float().permute(0, 1, 3, 2) + bias)
        o = g.reshape((g.cast(p, v.dtype) @ v).permute(0, 2, 1, 3), [0, 0, inner])
        return self.linear(o, f"{key}.o.weight", inner, t.d_model).float()

    def encoder(self, ids: Value, mask: Value, buckets: Value) -> Value:
        g, t = self.g, self.t
        shape, chunks = self.w.chunks("shared.weight", (t.vocab_size, t.d_model))
        h = g.op("Gather", g.param(chunks, shape, name="shared"), ids, axis=0).float()
        table = g.param(self.w.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                   (t.relative_attention_num_buckets, t.num_heads)), dtype=F32, name="rel")
        rel = g.unsqueeze(g.op("Gather", table, buckets, axis=0).permute(2, 0, 1), [0])  # [1,H,N,N]
        bias = rel + g.unsqueeze((1.0 - mask.float()) * MASKED, [1, 2])
        for i in range(t.num_layers):
            base = f"encoder.block.{i}.layer"
            x = self.norm(h, f"{base}.0.layer_norm.weight")
            h = h + self.attention(x, f"{base}.0.SelfAttention", bias)
            x = self.norm(h, f"{base}.1.layer_norm.weight")
            y = g.relu(self.linear(x, f"{base}.1.DenseReluDense.wi.weight", t.d_model, t.d_ff))
            h = h + self.linear(y, f"{base}.1.DenseReluDense.wo.weight", t.d_ff, t.d_model).float()
        return self.norm(h, "encoder.final_layer_norm.weight")


def build(root, folder, dtype, cfg: MusicgenConfig) -> dict:
    w = PrefixWeights(root, "text_encoder.", drop_prefixes=("encoder.embed_tokens.",))
    p = PrefixWeights(root, "enc_to_dec_proj.") if cfg.has_projection else None
    t, hidden = cfg.text, cfg.decoder.hidden_size
    g = Graph("mg_text_encoder", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        ids = g.input("input_ids", I64, ["B", "N"])
        mask = g.input("attention_mask", I64, ["B", "N"])
        buckets = g.input("buckets", I64, ["N", "N"])
        h = b.encoder(ids, mask, buckets)
        g.output(h, "last_hidden_state", ["B", "N", t.d_model])
        s = h
        if p is not None:
            s = g.linear(h, g.param(p.get("weight", (hidden, t.d_model)).T, name="enc_to_dec_proj.weight"),
                         g.param(p.get("bias", (hidden,)), dtype=F32, name="enc_to_dec_proj.bias")).float()
            p.finish()
        g.output(s * g.unsqueeze(mask.float(), [2]), "states", ["B", "N", hidden])
        w.finish()
        return [("mg_text_encoder", g.save("MusicGen T5 text encoder + enc_to_dec_proj"))]
    except BaseException:
        g.abandon()
        raise

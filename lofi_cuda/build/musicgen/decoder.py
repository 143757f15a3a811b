"""MusicGen's decoder (MusicgenForCausalLM) as two graphs, as the token loop uses them:

* `mg_cross_kv`: text states [R,L,H] -> every layer's cross-attention keys/values (once a run);
* `mg_decoder`: the next S columns of ids [R,K,S] + the self-attention cache of P columns ->
  logits [R,K,S,V] (fp32) and the cache grown to P+S (`present.i.key` etc. fed back as `past.`).

Positions (the [cos | sin] table rows), the causal bias [S,P+S] and the cross bias [R,1,1,L]
are inputs built in numpy. The bias is finite (-1e30): the null rows' all-masked cross-attention
softmaxes to uniform weights over zero values (no k/v bias), so it gives 0 like transformers,
never NaN. Scores, softmax, LayerNorms and the residual stream are fp32 at every precision.
"""

from __future__ import annotations

import numpy as np

from lofi.musicgen.configs import MusicgenConfig

from lofi_cuda.build.graph import F32, I64, Graph, Value
from lofi_cuda.build.musicgen.weights import PrefixWeights

LN_EPS = 1e-5


def _weights(root) -> PrefixWeights:
    return PrefixWeights(root, "decoder.", drop_prefixes=("model.decoder.embed_positions.",))


class Builder:
    def __init__(self, g: Graph, w: PrefixWeights, cfg: MusicgenConfig):
        self.g, self.w, self.d = g, w, cfg.decoder
        self.heads = self.d.num_attention_heads
        self.dh = self.d.hidden_size // self.heads

    def linear(self, x: Value, key: str, cin: int, cout: int) -> Value:
        return self.g.linear(x, self.g.param(self.w.get(key, (cout, cin)).T, name=key))

    def layer_norm(self, x: Value, key: str) -> Value:
        g, d = self.g, self.d.hidden_size
        s = g.param(self.w.get(key + ".weight", (d,)), dtype=F32, name=key + ".weight")
        b = g.param(self.w.get(key + ".bias", (d,)), dtype=F32, name=key + ".bias")
        return g.op("LayerNormalization", x.float(), s, b, axis=-1, epsilon=LN_EPS)

    def split(self, x: Value) -> Value:
        return self.g.reshape(x, [0, 0, self.heads, self.dh]).permute(0, 2, 1, 3)

    def kv(self, x: Value, key: str) -> tuple[Value, Value]:
        h = self.d.hidden_size
        return (self.split(self.linear(x, key + ".k_proj.weight", h, h)),
                self.split(self.linear(x, key + ".v_proj.weight", h, h)))

    def attend(self, x: Value, key: str, k: Value, v: Value, bias: Value) -> Value:
        g, h = self.g, self.d.hidden_size
        q = self.split(self.linear(x, key + ".q_proj.weight", h, h).float() * float(self.dh ** -0.5))
        p = g.softmax(q @ k.float().permute(0, 1, 3, 2) + bias)
        o = g.reshape((g.cast(p, v.dtype) @ v).permute(0, 2, 1, 3), [0, 0, h])
        return self.linear(o, key + ".out_proj.weight", h, h).float()

    def embed(self, ids: Value) -> Value:
        """Sum of the K codebook embeddings of ids [R,K,S] -> [R,S,H] (one stacked table)."""
        g, d = self.g, self.d
        n, k = d.vocab_size + 1, d.num_codebooks
        keys = [f"model.decoder.embed_tokens.{i}.weight" for i in range(k)]
        table = g.param((self.w.get(key, (n, d.hidden_size)) for key in keys), (k * n, d.hidden_size),
                        name="embed_tokens")
        flat = ids + g.const(np.arange(k, dtype=np.int64).reshape(1, k, 1) * n, I64)
        e = g.op("Gather", table, flat, axis=0).float()                       # [R,K,S,H]
        return g.op("ReduceSum", e, g.ints([1]), keepdims=0)

    def heads_out(self, h: Value) -> Value:
        g, d = self.g, self.d
        keys = [f"lm_heads.{i}.weight" for i in range(d.num_codebooks)]
        w = g.param((self.w.get(key, (d.vocab_size, d.hidden_size)).T for key in keys),
                    (d.num_codebooks, d.hidden_size, d.vocab_size), name="lm_heads")
        return g.linear(g.unsqueeze(h, [1]), w).float()                        # [R,K,S,V]


def _layer(i: int) -> str:
    return f"model.decoder.layers.{i}"


def build_cross(root, folder, dtype, cfg: MusicgenConfig) -> dict:
    w = _weights(root)
    w.ignored |= {k for k in w.keys() if ".encoder_attn.k_proj." not in k and ".encoder_attn.v_proj." not in k}
    d = cfg.decoder
    g = Graph("mg_cross_kv", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        enc = g.input("enc_states", F32, ["R", "L", d.hidden_size])
        for i in range(d.num_hidden_layers):
            k, v = b.kv(enc, f"{_layer(i)}.encoder_attn")
            g.output(k, f"cross.{i}.key", ["R", b.heads, "L", b.dh])
            g.output(v, f"cross.{i}.value", ["R", b.heads, "L", b.dh])
        w.finish()
        return g.save("MusicGen decoder: cross-attention keys/values of the text")
    except BaseException:
        g.abandon()
        raise


def build_step(root, folder, dtype, cfg: MusicgenConfig) -> dict:
    w = _weights(root)
    w.ignored |= {k for k in w.keys() if ".encoder_attn.k_proj." in k or ".encoder_attn.v_proj." in k}
    d = cfg.decoder
    g = Graph("mg_decoder", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        kv_dims = lambda n: ["R", b.heads, n, b.dh]  # noqa: E731
        ids = g.input("ids", I64, ["R", d.num_codebooks, "S"])
        pos = g.input("pos", F32, ["S", d.hidden_size])
        self_bias = g.input("self_bias", F32, ["S", "T"])
        cross_bias = g.input("cross_bias", F32, ["R", 1, 1, "L"])
        h = b.embed(ids) + pos
        for i in range(d.num_hidden_layers):
            key = _layer(i)
            x = b.layer_norm(h, f"{key}.self_attn_layer_norm")
            k, v = b.kv(x, f"{key}.self_attn")
            pk = g.input(f"past.{i}.key", g.dtype, kv_dims("P"))
            pv = g.input(f"past.{i}.value", g.dtype, kv_dims("P"))
            k, v = g.concat([pk, k], 2), g.concat([pv, v], 2)
            g.output(k, f"present.{i}.key", kv_dims("T"))
            g.output(v, f"present.{i}.value", kv_dims("T"))
            h = h + b.attend(x, f"{key}.self_attn", k, v, self_bias)
            x = b.layer_norm(h, f"{key}.encoder_attn_layer_norm")
            ck = g.input(f"cross.{i}.key", g.dtype, kv_dims("L"))
            cv = g.input(f"cross.{i}.value", g.dtype, kv_dims("L"))
            h = h + b.attend(x, f"{key}.encoder_attn", ck, cv, cross_bias)
            x = b.layer_norm(h, f"{key}.final_layer_norm")
            y = g.gelu(b.linear(x, f"{key}.fc1.weight", d.hidden_size, d.ffn_dim).float())
            h = h + b.linear(y, f"{key}.fc2.weight", d.ffn_dim, d.hidden_size).float()
        h = b.layer_norm(h, "model.decoder.layer_norm")
        g.output(b.heads_out(h), "logits", ["R", d.num_codebooks, "S", d.vocab_size])
        w.finish()
        return g.save("MusicGen decoder step with a self-attention KV cache")
    except BaseException:
        g.abandon()
        raise

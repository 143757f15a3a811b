"""MusicGen's decoder (MusicgenForCausalLM) as graphs, as the token loop uses them:

* `mg_cross_kv`: text states [R,L,H] -> every layer's cross-attention keys/values (once a run);
* `mg_decoder` (CPU): the next S columns of ids [R,K,S] attend to a cache buffer of C >= P
  columns the engine owns (`cache.i.key` [R,h,C,dh], columns >= P masked) and return only their
  own keys/values (`new.i.key` [R,h,S,dh]), which the engine writes into the buffer in place: no
  per-step copy of the whole cache;
* `mg_decoder_cat` (CUDA): the cache of P columns in (`past.i.key`), grown to P+S out
  (`present.i.key`), so it can stay on the GPU between steps (IO binding).
The two step graphs share one weight file. Logits [R,K,S,V] are fp32.

Positions (the [cos | sin] table rows), the causal bias and the cross bias [R,1,1,L] are inputs
built in numpy. The bias is finite (-1e30): the null rows' all-masked cross-attention
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
        self.params: dict[str, Value] = {}  # written once, shared by the graph variants

    def param(self, name: str, make, dtype=None) -> Value:
        if name not in self.params:
            arr = make()
            shape = None if isinstance(arr, np.ndarray) else arr[0]
            self.params[name] = (self.g.param(arr, dtype=dtype, name=name) if shape is None
                                 else self.g.param(arr[1], shape, dtype=dtype, name=name))
        return self.params[name]

    def linear(self, x: Value, key: str, cin: int, cout: int) -> Value:
        return self.g.linear(x, self.param(key, lambda: self.w.get(key, (cout, cin)).T))

    def layer_norm(self, x: Value, key: str) -> Value:
        g, d = self.g, self.d.hidden_size
        s = self.param(key + ".weight", lambda: self.w.get(key + ".weight", (d,)), F32)
        b = self.param(key + ".bias", lambda: self.w.get(key + ".bias", (d,)), F32)
        return g.op("LayerNormalization", x.float(), s, b, axis=-1, epsilon=LN_EPS)

    def split(self, x: Value) -> Value:
        return self.g.reshape(x, [0, 0, self.heads, self.dh]).permute(0, 2, 1, 3)

    def kv(self, x: Value, key: str) -> tuple[Value, Value]:
        h = self.d.hidden_size
        return (self.split(self.linear(x, key + ".k_proj.weight", h, h)),
                self.split(self.linear(x, key + ".v_proj.weight", h, h)))

    def query(self, x: Value, key: str) -> Value:
        h = self.d.hidden_size
        return self.split(self.linear(x, key + ".q_proj.weight", h, h).float() * float(self.dh ** -0.5))

    def out(self, o: Value, key: str) -> Value:
        h = self.d.hidden_size
        o = self.g.reshape(o.permute(0, 2, 1, 3), [0, 0, h])
        return self.linear(o, key + ".out_proj.weight", h, h).float()

    def attend(self, x: Value, key: str, k: Value, v: Value, bias: Value) -> Value:
        g = self.g
        p = g.softmax(self.query(x, key) @ k.float().permute(0, 1, 3, 2) + bias)
        return self.out(g.cast(p, v.dtype) @ v, key)

    def attend_split(self, x: Value, key: str, ck: Value, cv: Value, k: Value, v: Value,
                     bias: Value) -> Value:
        """Attention over [cache buffer | new columns] without joining them: scores are joined
        (small), the weighted sums are added."""
        g = self.g
        q = self.query(x, key)
        s = g.concat([q @ ck.float().permute(0, 1, 3, 2), q @ k.float().permute(0, 1, 3, 2)], 3)
        p = g.softmax(s + bias)
        c, n = g.shape(ck, 2, 3), g.shape(p, 3, 4)
        p_cache = g.op("Slice", p, g.ints([0]), c, g.ints([3]))
        p_new = g.op("Slice", p, c, n, g.ints([3]))
        return self.out(g.cast(p_cache, cv.dtype) @ cv + g.cast(p_new, v.dtype) @ v, key)

    def embed(self, ids: Value) -> Value:
        """Sum of the K codebook embeddings of ids [R,K,S] -> [R,S,H] (one stacked table)."""
        g, d = self.g, self.d
        n, k = d.vocab_size + 1, d.num_codebooks
        keys = [f"model.decoder.embed_tokens.{i}.weight" for i in range(k)]
        table = self.param("embed_tokens", lambda: ((k * n, d.hidden_size),
                                                    (self.w.get(key, (n, d.hidden_size)) for key in keys)))
        flat = ids + g.const(np.arange(k, dtype=np.int64).reshape(1, k, 1) * n, I64)
        e = g.op("Gather", table, flat, axis=0).float()                       # [R,K,S,H]
        return g.op("ReduceSum", e, g.ints([1]), keepdims=0)

    def heads_out(self, h: Value) -> Value:
        g, d = self.g, self.d
        keys = [f"lm_heads.{i}.weight" for i in range(d.num_codebooks)]
        shape = (d.num_codebooks, d.hidden_size, d.vocab_size)
        w = self.param("lm_heads", lambda: (shape, (self.w.get(key, (d.vocab_size, d.hidden_size)).T
                                                    for key in keys)))
        return g.linear(g.unsqueeze(h, [1]), w).float()                        # [R,K,S,V]


def _layer(i: int) -> str:
    return f"model.decoder.layers.{i}"


def build_cross(root, folder, dtype, cfg: MusicgenConfig) -> dict:
    w = _weights(root)
    w.ignored |= {k for k in w.keys()
                  if ".encoder_attn.k_proj." not in k and ".encoder_attn.v_proj." not in k}
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
        return [("mg_cross_kv", g.save("MusicGen decoder: cross-attention keys/values of the text"))]
    except BaseException:
        g.abandon()
        raise


def _step(g: Graph, b: Builder, cached: bool) -> None:
    """One step graph: `cached` = the CPU form (cache buffer in, new columns out), else the
    concatenating form (past in, present out)."""
    d = b.d
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
        if cached:
            ck = g.input(f"cache.{i}.key", g.dtype, kv_dims("C"))
            cv = g.input(f"cache.{i}.value", g.dtype, kv_dims("C"))
            g.output_as(k, f"new.{i}.key", kv_dims("S"))
            g.output_as(v, f"new.{i}.value", kv_dims("S"))
            h = h + b.attend_split(x, f"{key}.self_attn", ck, cv, k, v, self_bias)
        else:
            pk = g.input(f"past.{i}.key", g.dtype, kv_dims("P"))
            pv = g.input(f"past.{i}.value", g.dtype, kv_dims("P"))
            k, v = g.concat([pk, k], 2), g.concat([pv, v], 2)
            g.output_as(k, f"present.{i}.key", kv_dims("T"))
            g.output_as(v, f"present.{i}.value", kv_dims("T"))
            h = h + b.attend(x, f"{key}.self_attn", k, v, self_bias)
        x = b.layer_norm(h, f"{key}.encoder_attn_layer_norm")
        ck = g.input(f"cross.{i}.key", g.dtype, kv_dims("L"))
        cv = g.input(f"cross.{i}.value", g.dtype, kv_dims("L"))
        h = h + b.attend(x, f"{key}.encoder_attn", ck, cv, cross_bias)
        x = b.layer_norm(h, f"{key}.final_layer_norm")
        y = g.gelu(b.linear(x, f"{key}.fc1.weight", d.hidden_size, d.ffn_dim).float())
        h = h + b.linear(y, f"{key}.fc2.weight", d.ffn_dim, d.hidden_size).float()
    h = b.layer_norm(h, "model.decoder.layer_norm")
    g.output_as(b.heads_out(h), "logits", ["R", d.num_codebooks, "S", d.vocab_size])


def build_step(root, folder, dtype, cfg: MusicgenConfig) -> list[tuple[str, dict]]:
    """Both step graphs over one weight file: [("mg_decoder_cat", spec), ("mg_decoder", spec)]."""
    w = _weights(root)
    w.ignored |= {k for k in w.keys() if ".encoder_attn.k_proj." in k or ".encoder_attn.v_proj." in k}
    g = Graph("mg_decoder", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        _step(g, b, cached=False)
        cat = g.save_variant("mg_decoder_cat", "MusicGen decoder step: past + present KV cache (GPU)")
        _step(g, b, cached=True)
        w.finish()
        return [("mg_decoder_cat", cat),
                ("mg_decoder", g.save("MusicGen decoder step over a cache buffer (CPU)"))]
    except BaseException:
        g.abandon()
        raise

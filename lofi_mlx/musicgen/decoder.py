"""MusicGen's decoder (MusicgenForCausalLM): K codebook embeddings summed + sinusoidal positions,
pre-LayerNorm transformer layers (causal self-attention, cross-attention to the text, GELU FFN),
a final LayerNorm and K lm_heads. A KV cache serves the step-by-step loop; the conditional and
unconditional (null text) rows run as one batch.

Traps kept: positions are [cos | sin] with freq_i = exp(-i ln(10000) / (H/2 - 1)); no embedding
scaling; no biases in attention or the FFN. The null rows' cross-attention has every key masked:
the mask value is finite, so softmax stays finite and, the null text states being 0 (no k/v
bias), the attention output is exactly 0, as transformers gives it, never NaN.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lofi.musicgen.configs import DecoderConfig, MusicgenConfig, load_weights
from lofi_mlx.acestep.common import load_strict
from lofi_mlx.mlxrt import mx, nn

MASKED = -1e30  # finite: an all-masked row softmaxes to uniform weights, not NaN
CACHE_STEP = 256


def sinusoidal_positions(n: int, dim: int) -> np.ndarray:
    """transformers' MusicgenSinusoidalPositionalEmbedding table [n, dim], fp32 like torch."""
    half = dim // 2
    f = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    ang = np.arange(n, dtype=np.float32)[:, None] * f.astype(np.float32)[None]
    ang = ang.astype(np.float64)
    return np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.h, self.dh = heads, dim // heads
        self.scale = self.dh ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def split(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.h, self.dh).transpose(0, 2, 1, 3)

    def kv(self, x):
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def attend(self, x, k, v, bias):
        b, n, _ = x.shape
        q = self.split(self.q_proj(x) * self.scale)
        s = q.astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2) + bias
        p = mx.softmax(s, axis=-1).astype(v.dtype)
        return self.out_proj((p @ v).transpose(0, 2, 1, 3).reshape(b, n, -1))


class KVCache:
    """Self-attention keys/values of one layer, grown in CACHE_STEP blocks."""

    def __init__(self):
        self.k = self.v = None
        self.n = 0

    def update(self, k, v):
        b, h, s, d = k.shape
        if self.k is None or self.n + s > self.k.shape[2]:
            size = ((self.n + s + CACHE_STEP - 1) // CACHE_STEP) * CACHE_STEP
            nk, nv = mx.zeros((b, h, size, d), k.dtype), mx.zeros((b, h, size, d), v.dtype)
            if self.k is not None:
                nk[:, :, :self.n] = self.k[:, :, :self.n]
                nv[:, :, :self.n] = self.v[:, :, :self.n]
            self.k, self.v = nk, nv
        self.k[:, :, self.n:self.n + s] = k
        self.v[:, :, self.n:self.n + s] = v
        self.n += s
        return self.k[:, :, :self.n], self.v[:, :, :self.n]


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = Attention(d, cfg.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, cfg.num_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, d, bias=False)
        self.final_layer_norm = nn.LayerNorm(d)

    def __call__(self, h, cache: KVCache, self_bias, cross_kv, cross_bias):
        x = self.self_attn_layer_norm(h)
        k, v = cache.update(*self.self_attn.kv(x))
        h = h + self.self_attn.attend(x, k, v, self_bias)
        x = self.encoder_attn_layer_norm(h)
        h = h + self.encoder_attn.attend(x, *cross_kv, cross_bias)
        return h + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = [nn.Embedding(cfg.vocab_size + 1, cfg.hidden_size)
                             for _ in range(cfg.num_codebooks)]
        self.layers = [Layer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.lm_heads = [nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                         for _ in range(cfg.num_codebooks)]
        self._positions = mx.array(sinusoidal_positions(cfg.max_position_embeddings, cfg.hidden_size))

    def start(self, enc_states, enc_mask) -> "Session":
        return Session(self, enc_states, enc_mask)

    def forward(self, ids, session: "Session", hidden_states: list | None = None):
        """ids [R, K, S] (the next S columns) -> logits [R, K, S, V] (fp32)."""
        r, k, s = ids.shape
        dtype = self.layer_norm.weight.dtype
        h = self.embed_tokens[0](ids[:, 0])
        for i in range(1, k):
            h = h + self.embed_tokens[i](ids[:, i])
        off = session.offset
        if off + s > self.config.max_position_embeddings:
            raise ValueError(f"decoder positions beyond {self.config.max_position_embeddings}")
        h = h + self._positions[off:off + s].astype(dtype)
        q = mx.arange(off, off + s)[:, None]
        kpos = mx.arange(off + s)[None, :]
        self_bias = mx.where(kpos <= q, 0.0, MASKED).astype(mx.float32)
        if hidden_states is not None:
            hidden_states.append(h)
        for layer, cache, ckv in zip(self.layers, session.caches, session.cross):
            h = layer(h, cache, self_bias, ckv, session.cross_bias)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.layer_norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h
        session.offset += s
        return mx.stack([head(h) for head in self.lm_heads], axis=1).astype(mx.float32)


class Session:
    """One decoding run: cross-attention keys/values of the text, computed once, and the cache."""

    def __init__(self, model: Decoder, enc_states, enc_mask):
        self.model = model
        self.cross = [layer.encoder_attn.kv(enc_states) for layer in model.layers]
        self.cross_bias = mx.where(enc_mask[:, None, None, :] > 0, 0.0, MASKED).astype(mx.float32)
        self.caches = [KVCache() for _ in model.layers]
        self.offset = 0


def sanitize(weights: dict) -> dict:
    """transformers `decoder.*` keys -> this module's (the positions are rebuilt, not stored)."""
    out = {}
    for k, v in weights.items():
        if k.startswith("model.decoder."):
            k = k[len("model.decoder."):]
        if k.startswith("embed_positions."):
            continue
        out[k] = v
    return out


def load(root: str | Path, cfg: MusicgenConfig, dtype) -> Decoder:
    model = Decoder(cfg.decoder)
    return load_strict(model, sanitize(load_weights(root, "decoder.")), dtype,
                       f"{root} (MusicGen decoder)")

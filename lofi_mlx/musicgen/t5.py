"""T5 encoder (MusicGen's text encoder, t5-base) + enc_to_dec_proj, as transformers runs them.

T5: no embedding scaling, no 1/sqrt(d) in attention, one relative-position bias table (block 0)
shared by every block, RMS norm (fp32 statistics), ReLU FFN. The projection's output is
multiplied by the attention mask, so padded positions are exactly 0 (not the bias).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lofi.acestep.tables import t5_buckets
from lofi.musicgen.configs import MusicgenConfig, T5Config, load_weights
from lofi_mlx.acestep.common import drop_keys, load_strict, rms_norm
from lofi_mlx.mlxrt import mx, nn


class Norm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x):
        return rms_norm(x, self.eps).astype(self.weight.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.h, self.dk = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def __call__(self, x, bias):
        b, n, _ = x.shape
        heads = lambda t: t.reshape(b, n, self.h, self.dk).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        s = q.astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2) + bias
        p = mx.softmax(s, axis=-1).astype(x.dtype)
        return self.o((p @ v).transpose(0, 2, 1, 3).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = Norm(cfg.d_model, cfg.layer_norm_epsilon)
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.ff_norm = Norm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, h, bias):
        h = h + self.attn(self.attn_norm(h), bias).astype(mx.float32)
        return h + self.wo(nn.relu(self.wi(self.ff_norm(h)))).astype(mx.float32)


class TextEncoder(nn.Module):
    """ids [B, L] -> T5 last_hidden_state [B, L, d_model]; `project` -> decoder width, masked."""

    def __init__(self, cfg: MusicgenConfig):
        super().__init__()
        t = cfg.text
        self.config = t
        self.shared = nn.Embedding(t.vocab_size, t.d_model)
        self.relative_attention_bias = nn.Embedding(t.relative_attention_num_buckets, t.num_heads)
        self.blocks = [Block(t) for _ in range(t.num_layers)]
        self.final_norm = Norm(t.d_model, t.layer_norm_epsilon)
        self.proj = nn.Linear(t.d_model, cfg.decoder.hidden_size) if cfg.has_projection else None

    def __call__(self, ids, mask):
        t = self.config
        n = ids.shape[1]
        buckets = mx.array(t5_buckets(n, t.relative_attention_num_buckets,
                                      t.relative_attention_max_distance).astype(np.int32))
        bias = self.relative_attention_bias(buckets).astype(mx.float32).transpose(2, 0, 1)[None]
        # transformers adds finfo.min for padded keys; any huge finite value gives the same zeros
        bias = bias + mx.where(mask[:, None, None, :] > 0, 0.0, -1e30).astype(mx.float32)
        h = self.shared(ids).astype(mx.float32)
        for blk in self.blocks:
            h = blk(h.astype(mx.float32), bias)
        return self.final_norm(h.astype(self.shared.weight.dtype))

    def project(self, hidden, mask):
        x = self.proj(hidden) if self.proj is not None else hidden
        return x * mask[..., None].astype(x.dtype)


def sanitize(weights: dict) -> dict:
    """transformers keys (text_encoder.*, enc_to_dec_proj.*) -> this module's."""
    out = {}
    for k, v in drop_keys(weights, prefixes=("text_encoder.encoder.embed_tokens.",)).items():
        if k.startswith("enc_to_dec_proj."):
            out["proj." + k[len("enc_to_dec_proj."):]] = v
            continue
        k = k[len("text_encoder."):]
        if k == "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            out["relative_attention_bias.weight"] = v
            continue
        k = (k.replace("encoder.block.", "blocks.").replace(".layer.0.SelfAttention.", ".attn.")
             .replace(".layer.0.layer_norm.", ".attn_norm.")
             .replace(".layer.1.DenseReluDense.", ".").replace(".layer.1.layer_norm.", ".ff_norm.")
             .replace("encoder.final_layer_norm.", "final_norm."))
        out[k] = v
    return out


def load(root: str | Path, cfg: MusicgenConfig, dtype) -> TextEncoder:
    w = load_weights(root, "text_encoder.")
    w = {"text_encoder." + k: v for k, v in w.items()}
    if cfg.has_projection:
        w.update({"enc_to_dec_proj." + k: v for k, v in load_weights(root, "enc_to_dec_proj.").items()})
    return load_strict(TextEncoder(cfg), sanitize(w), dtype, f"{root} (T5 text encoder)")

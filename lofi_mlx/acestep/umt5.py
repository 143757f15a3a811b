"""UMT5 encoder (umt5-base, encoder only): prompt token ids -> last_hidden_state [B, Nt, d_model].

T5 conventions: no embedding scaling, no attention 1/sqrt(d), RMS norm without mean or bias,
gated tanh-GELU FFN. UMT5 differs from T5 in that every layer has its own relative-position
bias table.

Half precision (fp16/bf16): T5 activations are known to overflow fp16 in the FFN output and the
residual stream (transformers keeps `wo` in fp32 and clamps infs for that reason). Here the
residual stream, the gated FFN product and `wo` (its weight included) stay fp32 in every
precision, and attention scores are formed in fp32; everything else runs in the run dtype.
This is overflow-free instead of clamped, so fp16 results are closer to fp32 than the
reference's own fp16 run would be.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import UMT5_ERG_LAYERS as ERG_LAYERS
from lofi.acestep.configs import UMT5_ERG_TAU as ERG_TAU
from lofi.acestep.configs import UMT5Config
from lofi.errors import INVALID_PARAMS, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn
from lofi.acestep.tables import t5_buckets as relative_buckets
from lofi_mlx.acestep.common import DTYPES
from lofi_mlx.acestep.common import drop_keys
from lofi_mlx.acestep.common import load_strict
from lofi_mlx.acestep.common import rms_norm

def erg_q_scale(num_layers: int, tau: float = ERG_TAU) -> list[float]:
    """Per-block q multipliers of the ERG "null" text embedding: tau on blocks 8 and 9."""
    lo, hi = ERG_LAYERS
    return [tau if lo <= i < hi else 1.0 for i in range(num_layers)]


class T5Norm(nn.Module):
    """RMS norm, fp32 statistics; the normalised value is cast to the weight's dtype first."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x):
        return rms_norm(x, self.eps).astype(self.weight.dtype) * self.weight


def gelu_tanh(x):
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def __call__(self, x, buckets, key_mask, q_scale: float = 1.0):
        B, N, _ = x.shape
        q = self.q(x)
        if q_scale != 1.0:
            q = q * mx.array(q_scale, dtype=q.dtype)  # rounded to the run dtype, like the hook
        heads = lambda t: t.reshape(B, N, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(self.k(x)), heads(self.v(x))
        bias = self.relative_attention_bias(buckets).astype(mx.float32).transpose(2, 0, 1)
        s = q.astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2) + bias + key_mask
        p = mx.softmax(s, axis=-1).astype(x.dtype)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(B, N, -1)
        return self.o(o)


class GatedFFN(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # weight kept fp32 by load()

    def __call__(self, x):
        g = gelu_tanh(self.wi_0(x).astype(mx.float32)) * self.wi_1(x).astype(mx.float32)
        return self.wo(g.astype(self.wo.weight.dtype))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = GatedFFN(cfg)
        self.ff_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, h, buckets, key_mask, q_scale: float = 1.0):
        # h: the fp32 residual stream
        h = h + self.attn(self.attn_norm(h), buckets, key_mask, q_scale).astype(mx.float32)
        return h + self.ff(self.ff_norm(h)).astype(mx.float32)


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = [Block(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def encode(self, input_ids: mx.array, attention_mask: mx.array,
               q_scale: list[float] | None = None) -> tuple[mx.array, list[mx.array]]:
        """(last_hidden_state [B, Nt, d] in the run dtype, hidden states).

        Hidden states as transformers' output_hidden_states: [embeddings, after block 0, ...,
        after block L-2, last_hidden_state] (fp32 residual stream; the last entry is the output,
        i.e. after the final norm, as transformers returns it).
        """
        cfg = self.config
        if q_scale is None:
            q_scale = [1.0] * cfg.num_layers
        if len(q_scale) != cfg.num_layers:
            raise LofiError(INVALID_PARAMS, f"q_scale has {len(q_scale)} entries for "
                            f"{cfg.num_layers} blocks")
        input_ids = mx.array(input_ids)
        n = input_ids.shape[1]
        buckets = mx.array(relative_buckets(n, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance).astype(np.int32))
        # Additive key mask: finfo(run dtype).min on padding keys, as the reference builds it.
        neg = float(mx.finfo(self.dtype).min)
        keep = mx.array(attention_mask).astype(mx.float32)
        key_mask = ((1.0 - keep) * neg)[:, None, None, :]
        h = self.embed_tokens(input_ids).astype(mx.float32)
        states = [h]
        for blk, s in zip(self.blocks, q_scale):
            h = blk(h, buckets, key_mask, float(s))
            states.append(h)
        out = self.final_norm(h)
        states[-1] = out
        return out, states

    def __call__(self, input_ids: mx.array, attention_mask: mx.array,
                 q_scale: list[float] | None = None) -> mx.array:
        return self.encode(input_ids, attention_mask, q_scale)[0]


def sanitize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map transformers UMT5 keys to this module's names."""
    # Only the encoder is used; a full UMT5 file also holds the decoder and the LM head.
    weights = drop_keys(weights, prefixes=("decoder.", "lm_head."))
    weights = dict(weights)
    # The token table is tied: `shared.weight` and `encoder.embed_tokens.weight` are the same
    # tensor and a file may store either name, or both.
    alias = weights.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in weights and alias is not None:
        weights["shared.weight"] = alias
    out = {}
    for k, v in weights.items():
        k = k.replace("shared.weight", "embed_tokens.weight")
        k = k.removeprefix("encoder.")
        k = k.replace("block.", "blocks.")
        k = k.replace("layer.0.SelfAttention.", "attn.")
        k = k.replace("layer.0.layer_norm.", "attn_norm.")
        k = k.replace("layer.1.DenseReluDense.", "ff.")
        k = k.replace("layer.1.layer_norm.", "ff_norm.")
        k = k.replace("final_layer_norm.", "final_norm.")
        out[k] = v
    return out


def load(checkpoint_root: str | Path, precision: str = "fp32") -> UMT5Encoder:
    if precision not in DTYPES:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    cfg_dict, raw = load_component(checkpoint_root, "text_encoder")
    cfg = UMT5Config.from_dict(cfg_dict)
    return from_weights(cfg, raw, precision, str(component_dir(checkpoint_root, "text_encoder")))


def from_weights(cfg: UMT5Config, raw: dict[str, np.ndarray], precision: str = "fp32",
                 source: str = "umt5-base") -> UMT5Encoder:
    """Build from raw checkpoint tensors (strict: every key must be used)."""
    # see the module docstring: wo stays fp32
    return load_strict(UMT5Encoder(cfg), sanitize(raw), DTYPES[precision], source,
                       keep_fp32=lambda k: k.endswith(".ff.wo.weight"))

"""UMT5 encoder (umt5-base, encoder only) in PyTorch, the oracle for the ONNX graphs (spec §2.2).

T5 conventions: no embedding scaling, no 1/sqrt(d) in attention, RMS norm without mean or bias,
gated tanh-GELU FFN; every layer has its own relative-position bias table.

Graph interface: `forward(input_ids [B,N] int64, attention_mask [B,N] int64, buckets [N,N]
int64, q_scale [layers] fp32) -> last_hidden_state [B,N,d] fp32`. `buckets` comes from
`lofi_cuda.tables.t5_buckets`; `q_scale` is 1 everywhere except the ERG "null" embedding
(0.01 on blocks 8-9).

Half precision: like the MLX port, the residual stream, the gated FFN product and `wo` stay
fp32 (T5 overflows fp16 there), and attention scores and softmax are fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import UMT5_ERG_LAYERS as ERG_LAYERS
from lofi.acestep.configs import UMT5_ERG_TAU as ERG_TAU
from lofi.acestep.configs import UMT5Config

from convert.torch_port.common import drop_keys, load_strict, meta_init, rms_norm, run_dtype

def erg_q_scale(num_layers: int, erg: bool = True) -> np.ndarray:
    lo, hi = ERG_LAYERS
    return np.array([ERG_TAU if erg and lo <= i < hi else 1.0 for i in range(num_layers)], np.float32)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class T5Norm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x):
        return rms_norm(x, self.eps).to(self.weight.dtype) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x, buckets, key_mask, q_scale):
        B, N, _ = x.shape
        # ERG: q times its scale, rounded to the run dtype like the reference's in-place hook
        q = (self.q(x).float() * q_scale).to(x.dtype)
        heads = lambda t: t.reshape(B, N, self.heads, self.d_kv).transpose(1, 2)
        q, k, v = heads(q), heads(self.k(x)), heads(self.v(x))
        bias = self.relative_attention_bias(buckets).float().permute(2, 0, 1)
        s = q.float() @ k.float().transpose(-1, -2) + bias + key_mask
        p = torch.softmax(s, dim=-1).to(x.dtype)
        return self.o((p @ v).transpose(1, 2).reshape(B, N, -1))


class GatedFFN(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # kept fp32 by load()

    def forward(self, x):
        g = gelu_tanh(self.wi_0(x).float()) * self.wi_1(x).float()
        return self.wo(g.to(self.wo.weight.dtype))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = GatedFFN(cfg)
        self.ff_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h, buckets, key_mask, q_scale):
        h = h + self.attn(self.attn_norm(h), buckets, key_mask, q_scale).float()
        return h + self.ff(self.ff_norm(h)).float()


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids, attention_mask, buckets, q_scale, states: list | None = None):
        # additive key mask: finfo(run dtype).min on padding keys, as the reference builds it
        neg = float(torch.finfo(self.dtype).min)
        key_mask = ((1.0 - attention_mask.float()) * neg)[:, None, None, :]
        h = self.embed_tokens(input_ids).float()              # the fp32 residual stream
        if states is not None:
            states.append(h)
        for i, blk in enumerate(self.blocks):
            h = blk(h, buckets, key_mask, q_scale[i])
            if states is not None:
                states.append(h)
        out = self.final_norm(h).float()
        if states is not None:
            states[-1] = out
        return out


def sanitize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers UMT5 keys -> this module's names."""
    # only the encoder is used; a full UMT5 file also holds the decoder and the LM head
    weights = dict(drop_keys(weights, prefixes=("decoder.", "lm_head.")))
    # the token table is tied: a file may store `shared.weight`, `encoder.embed_tokens.weight` or both
    alias = weights.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in weights and alias is not None:
        weights["shared.weight"] = alias
    out = {}
    for k, v in weights.items():
        k = k.replace("shared.weight", "embed_tokens.weight").removeprefix("encoder.")
        k = k.replace("block.", "blocks.")
        k = k.replace("layer.0.SelfAttention.", "attn.").replace("layer.0.layer_norm.", "attn_norm.")
        k = k.replace("layer.1.DenseReluDense.", "ff.").replace("layer.1.layer_norm.", "ff_norm.")
        k = k.replace("final_layer_norm.", "final_norm.")
        out[k] = v
    return out


def load(checkpoint_root: str | Path, precision: str = "fp32") -> UMT5Encoder:
    dtype = run_dtype(precision)
    cfg_dict, raw = load_component(checkpoint_root, "text_encoder")
    model = meta_init(UMT5Encoder, UMT5Config.from_dict(cfg_dict))
    return load_strict(model, sanitize(raw), dtype, str(component_dir(checkpoint_root, "text_encoder")),
                       keep_fp32=(".ff.wo.",))

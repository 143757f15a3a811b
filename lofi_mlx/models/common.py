"""Shared pieces of the MLX networks: strict weight loading and fp32-island norms."""

from __future__ import annotations

import numpy as np
from mlx.utils import tree_flatten

from ..errors import MODEL_LOAD_FAILED, LofiError
from ..mlxrt import mx, nn

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}


def drop_keys(weights: dict, prefixes: tuple[str, ...] = (), contains: tuple[str, ...] = ()) -> dict:
    """Drop checkpoint keys that are unused at inference, on purpose and by name."""
    return {k: v for k, v in weights.items()
            if not k.startswith(prefixes) and not any(c in k for c in contains)}


def load_strict(model: nn.Module, weights: dict[str, np.ndarray], dtype, source: str) -> nn.Module:
    """Load mapped weights into `model`; any missing, unexpected or mis-shaped key is an error."""
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise LofiError(MODEL_LOAD_FAILED, f"{source}: weights do not match the model: " + "; ".join(parts))
    for k, p in params.items():
        if tuple(weights[k].shape) != tuple(p.shape):
            raise LofiError(MODEL_LOAD_FAILED, f"{source}: {k} has shape {list(weights[k].shape)}, "
                            f"the model expects {list(p.shape)}")
    items = []
    for k in params:
        # convert and evaluate one tensor at a time: no second full-size copy of the model
        a = mx.array(np.ascontiguousarray(weights[k], dtype=np.float32)).astype(dtype)
        mx.eval(a)
        items.append((k, a))
    model.load_weights(items)
    model.eval()
    return model


def rms_norm(x, eps: float, weight=None):
    """RMS over the last axis with fp32 statistics, cast back to the input dtype."""
    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if weight is None else y * weight


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis with fp32 statistics."""
    xf = x.astype(mx.float32)
    mu = mx.mean(xf, axis=-1, keepdims=True)
    var = mx.mean(mx.square(xf - mu), axis=-1, keepdims=True)
    y = ((xf - mu) * mx.rsqrt(var + eps)).astype(x.dtype)
    return y * weight + bias


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """W = g * v / ||v||, the norm over every axis but 0 (legacy torch weight_norm, dim=0)."""
    v = v.astype(np.float64)
    norm = np.sqrt((v * v).reshape(v.shape[0], -1).sum(axis=1))
    return (g.reshape(-1).astype(np.float64) / norm).reshape((-1,) + (1,) * (v.ndim - 1)) * v

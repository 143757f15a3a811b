"""Shared pieces of the PyTorch port: strict loading, fp32-island norms, weight-norm folding."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lofi.checkpoint import check_weights
from lofi.errors import INVALID_PARAMS, LofiError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def drop_keys(weights: dict, prefixes: tuple[str, ...] = (), contains: tuple[str, ...] = ()) -> dict:
    """Drop checkpoint keys that are unused at inference, on purpose and by name."""
    return {k: v for k, v in weights.items()
            if not k.startswith(prefixes) and not any(c in k for c in contains)}


def load_strict(model: nn.Module, weights: dict[str, np.ndarray], dtype: torch.dtype, source: str,
                keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Load mapped weights; a missing, unexpected or mis-shaped key is an error.

    Build `model` under `with torch.device("meta")` to skip allocating and initialising its
    parameters (the full DiT would take 10 GB for nothing); `meta_init` does that.

    Parameters whose name contains one of `keep_fp32` stay fp32 in every precision.
    """
    params = dict(model.named_parameters())
    check_weights({k: p.shape for k, p in params.items()}, weights, source)
    state = {}
    for k, p in params.items():
        w = weights[k]
        dt = torch.float32 if any(s in k for s in keep_fp32) else dtype
        state[k] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dt)
    # assign=True: the module may be built on the meta device (no memory for random init)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def meta_init(cls, *args):
    """Construct a module without materialising its parameters (load_strict assigns them)."""
    with torch.device("meta"):
        return cls(*args)


def rms_norm(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """RMS over `dim` with fp32 statistics, cast back to the input dtype."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).mean(dim, keepdim=True) + eps)).to(x.dtype)


def layer_norm(x: torch.Tensor, weight, bias, eps: float, dim: int = -1) -> torch.Tensor:
    """LayerNorm over `dim` with fp32 statistics; affine in the input dtype."""
    xf = x.float()
    mu = xf.mean(dim, keepdim=True)
    d = xf - mu
    y = (d * torch.rsqrt((d * d).mean(dim, keepdim=True) + eps)).to(x.dtype)
    return y * weight + bias


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """W = g * v / ||v||, the norm over every axis but 0 (legacy torch weight_norm, dim=0)."""
    v = np.asarray(v, dtype=np.float64)
    norm = np.sqrt((v * v).reshape(v.shape[0], -1).sum(axis=1))
    return (np.asarray(g, dtype=np.float64).reshape(-1) / norm).reshape((-1,) + (1,) * (v.ndim - 1)) * v

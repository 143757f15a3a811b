"""Position and frequency tables, numpy only, built exactly as the reference builds them.

One source for every runtime: the MLX networks wrap them in mx arrays, the torch port and ONNX
Runtime take them as graph inputs (`lofi_cuda.tables` re-exports them), so the graphs stay free
of data-dependent table construction and no framework is imported here.
"""

from __future__ import annotations

import math

import numpy as np

TIME_CHANNELS = 256


def _round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """Round fp32 values to the run dtype and widen back (the reference casts its buffers)."""
    x = np.asarray(x, np.float32)
    if precision == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if precision == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return u.astype(np.uint32).view(np.float32)
    return x


def t5_buckets(n: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Bidirectional T5 bucket of (key - query), int64 [n, n]; fp32 log, truncation toward zero."""
    pos = np.arange(n)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    a = np.abs(rel)
    with np.errstate(divide="ignore"):
        large = np.log(a.astype(np.float32) / np.float32(exact)) / np.float32(
            math.log(max_distance / exact)) * np.float32(half - exact)
    large = np.minimum(exact + np.trunc(np.where(a < exact, 0, large)).astype(np.int64), half - 1)
    return (np.where(rel > 0, half, 0) + np.where(a < exact, a, large)).astype(np.int64)


def rope_tables(n: int, head_dim: int, theta: float, precision: str = "fp32"):
    """cos, sin fp32 [n, head_dim]; element j of a head uses frequency f_(j mod head_dim/2)."""
    expo = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float64(np.float32(theta)) ** expo.astype(np.float64)).astype(np.float32)
           .astype(np.float64)).astype(np.float32)
    ang = np.arange(n, dtype=np.float32)[:, None] * inv[None]       # fp32 product, as torch.outer
    ang = np.concatenate([ang, ang], axis=-1).astype(np.float64)
    return (_round_to(np.cos(ang).astype(np.float32), precision),
            _round_to(np.sin(ang).astype(np.float32), precision))


def relative_positions(n: int, width: int, precision: str = "fp32") -> np.ndarray:
    """Conformer sinusoids for relative positions n-1 ... -(n-1) (row k holds r = n-1-k)."""
    r = np.arange(n - 1, -n, -1, dtype=np.float32)[:, None]
    omega = np.exp(np.arange(0, width, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / width))
    ang = (r * omega[None]).astype(np.float32)
    pe = np.empty((2 * n - 1, width), np.float32)
    pe[:, 0::2] = np.sin(ang)
    pe[:, 1::2] = np.cos(ang)
    return _round_to(pe, precision)


def relative_index(n: int) -> np.ndarray:
    """Column of the (2n-1)-wide score table holding relative position i - j: (n-1) - (i-j)."""
    i = np.arange(n)
    return ((n - 1) - (i[:, None] - i[None, :])).astype(np.int64)


def time_frequencies(channels: int = TIME_CHANNELS) -> np.ndarray:
    """exp(-ln(10000) k / half), k < half, fp32 (diffusers Timesteps, shift 0)."""
    half = channels // 2
    expo = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(expo.astype(np.float64)).astype(np.float32)

"""Classifier-free guidance variants of ACE-Step v1 (spec §6), numpy float32.

Velocities are [B, 8, 16, T]; APG reduces over the last two axes per (batch, channel).
"""

from __future__ import annotations

import numpy as np

CFG_TYPES = ("apg", "cfg", "cfg_star")
APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
APG_ETA = 0.0
_AXES = (-2, -1)
_F32 = np.float32


class MomentumBuffer:
    """Running sum r <- x + momentum * r, kept across the guided steps of one run."""

    def __init__(self, momentum: float = APG_MOMENTUM):
        self.momentum = momentum
        self.running_average = None   # the reference starts from the scalar 0

    def update(self, value: np.ndarray) -> None:
        if self.running_average is None:
            self.running_average = np.array(value, dtype=_F32)
        else:
            self.running_average = value + _F32(self.momentum) * self.running_average


def _norm(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(a, dtype=np.float64), axis=_AXES, keepdims=True))


def apg(cond: np.ndarray, uncond: np.ndarray, scale: float,
        buffer: MomentumBuffer | None = None, eta: float = APG_ETA,
        norm_threshold: float = APG_NORM_THRESHOLD) -> np.ndarray:
    """Adaptive projected guidance: momentum, norm clip, then keep the part of the guidance
    difference orthogonal to the conditional velocity (projection in float64)."""
    cond = np.asarray(cond, _F32)
    diff = cond - np.asarray(uncond, _F32)
    if buffer is not None:
        buffer.update(diff)
        diff = buffer.running_average
    if norm_threshold > 0:
        n = _norm(diff).astype(_F32)
        with np.errstate(divide="ignore"):
            diff = diff * np.minimum(_F32(1), _F32(norm_threshold) / n)
    d64 = diff.astype(np.float64)
    c64 = cond.astype(np.float64)
    unit = c64 / np.maximum(_norm(c64), 1e-12)
    par = np.sum(d64 * unit, axis=_AXES, keepdims=True) * unit
    orth = (d64 - par).astype(_F32)
    update = orth + _F32(eta) * par.astype(_F32)
    return cond + _F32(scale - 1) * update


def cfg(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    cond, uncond = np.asarray(cond, _F32), np.asarray(uncond, _F32)
    return uncond + _F32(scale) * (cond - uncond)


def cfg_star(cond: np.ndarray, uncond: np.ndarray, scale: float, step_index: int,
             zero_steps: int = 1, use_zero_init: bool = True) -> np.ndarray:
    """CFG-Zero*: rescale uncond by the optimal alpha per item; the first steps output zero.

    step_index is the global loop index, so the zero-init only bites when the guidance
    interval starts at 0 or 1 (spec §6.4).
    """
    cond, uncond = np.asarray(cond, _F32), np.asarray(uncond, _F32)
    if step_index <= zero_steps and use_zero_init:
        return cond * _F32(0)
    b = cond.shape[0]
    c64 = cond.reshape(b, -1).astype(np.float64)
    u64 = uncond.reshape(b, -1).astype(np.float64)
    dot = np.sum(c64 * u64, axis=1).astype(_F32)
    sq = np.sum(u64 * u64, axis=1).astype(_F32) + _F32(1e-8)
    alpha = (dot / sq).reshape((b,) + (1,) * (cond.ndim - 1))
    return uncond * alpha + _F32(scale) * (cond - uncond * alpha)


def cfg_double(cond: np.ndarray, uncond: np.ndarray, text_only: np.ndarray,
               g_text: float, g_lyric: float) -> np.ndarray:
    """Double-condition guidance: separate strengths for the text and the lyric condition."""
    cond, uncond = np.asarray(cond, _F32), np.asarray(uncond, _F32)
    text_only = np.asarray(text_only, _F32)
    return (_F32(1 - g_text) * uncond + _F32(g_text - g_lyric) * text_only
            + _F32(g_lyric) * cond)


def guidance_window(n: int, interval: float) -> tuple[int, int]:
    """[start, end) of the guided loop indices, computed from the number of inference steps."""
    return int(n * ((1 - interval) / 2)), int(n * (interval / 2 + 0.5))


def guidance_scale_at(i: int, start: int, end: int, scale: float, min_scale: float,
                      decay: float) -> float:
    """Guidance scale at loop index i, decaying linearly towards min_scale when decay > 0.

    The reference divides by (end - start - 1) and crashes on a one-step window; here that
    window simply keeps the full scale.
    """
    if decay <= 0:
        return scale
    span = end - start - 1
    progress = (i - start) / span if span > 0 else 0.0
    return scale - (scale - min_scale) * progress * decay

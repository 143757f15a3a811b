"""Flow-matching schedules and update rules of ACE-Step v1 (spec §5), in numpy float32.

The arithmetic follows the reference operation by operation in float32 so that a fp32 run
matches it to a few ulps; only the sums behind means are taken in float64 (then rounded),
which is at least as accurate as torch's fp32 reductions.
"""

from __future__ import annotations

import numpy as np

SCHEDULERS = ("euler", "heun", "pingpong")
SHIFT = 3.0
TRAIN_STEPS = 1000

_F32 = np.float32


def shift_sigma(s, shift: float = SHIFT):
    return shift * s / (1 + (shift - 1) * s)


def scheduler_bounds(shift: float = SHIFT, sigma_max: float = 1.0) -> tuple[float, float]:
    """(sigma_max*, sigma_min*) of the scheduler constructor: the ends of its shifted training grid.

    Audio2audio mixes the reference latents with sigma_max* (= shift(1 - strength)).
    """
    # np.linspace(1, 1000*sigma_max, 1000, float32) reversed: only the two ends matter.
    grid_ends = np.array([TRAIN_STEPS * sigma_max, 1.0], dtype=np.float64).astype(_F32)
    s = grid_ends / _F32(TRAIN_STEPS)
    s = (_F32(shift) * s) / (_F32(1) + _F32(shift - 1) * s)
    return float(s[0]), float(s[1])


def omega_rescale(omega: float) -> float:
    """Logistic map of omega_scale onto (0.9, 1.1); 10 -> 1.0462117."""
    return 0.9 + 0.2 / (1 + np.exp(-0.1 * omega))


def timesteps_sigmas(scheduler: str, n: int, shift: float = SHIFT,
                     sigma_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps fed to the DiT (t = 1000*sigma, float32) and the sigmas (float32, ending in 0).

    euler/pingpong: n timesteps, n+1 sigmas. heun: 2n-1 timesteps, 2n sigmas (every sigma but
    the first and the final 0 duplicated). The shift is applied a second time here (trap 5).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    hi, lo = scheduler_bounds(shift, sigma_max)
    u = np.linspace(hi * TRAIN_STEPS, lo * TRAIN_STEPS, n) / TRAIN_STEPS
    sig = shift_sigma(u, shift).astype(_F32)
    t = sig * _F32(TRAIN_STEPS)
    sig = np.concatenate([sig, np.zeros(1, _F32)])
    if scheduler == "heun":
        t = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        sig = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
    return t, sig


def _omega_update(dx: np.ndarray, omega32) -> np.ndarray:
    # mean over every element, batch included: the reference couples the batch here
    m = _F32(dx.mean(dtype=np.float64))
    return (dx - m) * omega32 + m


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=_F32)


class EulerStep:
    """x <- x + omega-scaled (sigma_{i+1} - sigma_i) * v  (spec §5.2)."""

    def __init__(self, sigmas: np.ndarray, omega: float = 10.0):
        self.sigmas = _f32(sigmas)
        self.omega = _F32(omega_rescale(omega))

    def __call__(self, v: np.ndarray, x: np.ndarray, index: int) -> np.ndarray:
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return _f32(x) + _omega_update(dt * _f32(v), self.omega)


class HeunStep:
    """Heun predictor/corrector over the duplicated schedule (spec §5.3), s_churn = 0.

    Even calls predict and remember (derivative, dt, x); odd calls correct from the stored x.
    """

    def __init__(self, sigmas: np.ndarray, omega: float = 10.0):
        self.sigmas = _f32(sigmas)
        self.omega = _F32(omega_rescale(omega))
        self._d = self._dt = self._x = None

    def __call__(self, v: np.ndarray, x: np.ndarray, index: int) -> np.ndarray:
        x, v = _f32(x), _f32(v)
        if self._dt is None:
            s, s_next = self.sigmas[index], self.sigmas[index + 1]
            d = (x - (x - v * s)) / s
            dt = s_next - s
            self._d, self._dt, self._x = d, dt, x
            base = x
        else:
            s = self.sigmas[index]
            d = _F32(0.5) * (self._d + (x - (x - v * s)) / s)
            dt, base = self._dt, self._x
            self._d = self._dt = self._x = None
        return base + _omega_update(d * dt, self.omega)


class PingPongStep:
    """SDE step: denoise fully, then re-noise to sigma_{i+1} with fresh noise (spec §5.4).

    Noise is drawn on every step, the last included (where its weight is 0), as the reference
    does; omega is ignored.
    """

    def __init__(self, sigmas: np.ndarray, noise_source):
        self.sigmas = _f32(sigmas)
        self.noise = noise_source

    def __call__(self, v: np.ndarray, x: np.ndarray, index: int) -> np.ndarray:
        x, v = _f32(x), _f32(v)
        s, s_next = self.sigmas[index], self.sigmas[index + 1]
        denoised = x - s * v
        eps = _f32(self.noise.randn(x.shape))
        return (_F32(1) - s_next) * denoised + s_next * eps


def make_step(scheduler: str, sigmas: np.ndarray, omega: float = 10.0, noise_source=None):
    if scheduler == "euler":
        return EulerStep(sigmas, omega)
    if scheduler == "heun":
        return HeunStep(sigmas, omega)
    if scheduler == "pingpong":
        if noise_source is None:
            raise ValueError("the pingpong scheduler needs a noise source")
        return PingPongStep(sigmas, noise_source)
    raise ValueError(f"unknown scheduler {scheduler!r}")

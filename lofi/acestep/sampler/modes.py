"""ACE-Step v1's audio-input modes (spec §12) on top of the text2music loop, numpy float32.

retake: only the start noise changes. repaint/extend: the repaint loop (plain Euler, no omega,
the source pinned outside a mask). audio2audio: the start mix of the reference latents, then
the normal loop on a sigma_max-capped schedule. edit: FlowEdit with its own loop.
Every noise draw goes through a NoiseSource, so parity runs inject the reference's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lofi.errors import INVALID_PARAMS, Cancelled, LofiError
from lofi.acestep.sampler.guidance import MomentumBuffer, apg
from lofi.acestep.sampler.loop import Conditions, Evaluator, SamplerParams, _recorder, _velocity
from lofi.acestep.sampler.schedules import SHIFT, scheduler_bounds, timesteps_sigmas

_F32 = np.float32
MAX_FRAMES = int(240 * 44100 / 512 / 8)  # 2583: the reference's maxT


def frame(seconds: float) -> int:
    """The reference's seconds -> latent frame (truncation toward 0, negative seconds too)."""
    return int(seconds * 44100 / 512 / 8)


def theta(variance: float) -> np.float32:
    return _F32(variance * math.pi / 2)


def retake_start(eps: np.ndarray, eps_r: np.ndarray, variance: float) -> np.ndarray:
    """x_T = cos(theta)*eps + sin(theta)*eps_r (§12.1)."""
    th = theta(variance)
    return np.cos(th) * _f32(eps) + np.sin(th) * _f32(eps_r)


def n_min(steps: int, variance: float) -> int:
    return int(steps * (1 - variance))


@dataclass
class RepaintPlan:
    """What the repaint loop needs: pinned latents x0, their re-noising noise z0, the mask
    (1 = generate) and the first executed step. For extend, x0 is the zero-padded source."""

    x0: np.ndarray
    z0: np.ndarray
    mask: np.ndarray
    first_step: int
    left: int = 0    # extend: frames added before the source
    right: int = 0   # extend: frames added after it


def repaint_plan(src: np.ndarray, start_frame: int, end_frame: int, eps: np.ndarray,
                 eps_r: np.ndarray, variance: float, steps: int) -> RepaintPlan:
    """§12.2: regenerate frames [start_frame, end_frame) of the source latents."""
    src = _f32(src)
    t = src.shape[-1]
    if not 0 <= start_frame < end_frame <= t:
        raise LofiError(INVALID_PARAMS, f"repaint window frames [{start_frame}, {end_frame}) "
                        f"are not inside the source's {t} frames", {"field": "repaint_start"})
    mask = np.zeros_like(src)
    mask[..., start_frame:end_frame] = 1
    th = theta(variance)
    z0 = np.where(mask == 1, np.cos(th) * _f32(eps) + np.sin(th) * _f32(eps_r), _f32(eps))
    return RepaintPlan(src, z0.astype(_F32), mask, n_min(steps, variance))


def extend_plan(src: np.ndarray, left: int, right: int, eps: np.ndarray, eps_r: np.ndarray,
                variance: float, steps: int) -> RepaintPlan:
    """§12.3 with the reference's evident intent: `left` zero frames before the source, `right`
    after it (the reference measures the right pad against the already left-padded length and
    crops or crashes past maxT; here both extents are exactly what was asked and a total past
    maxT is refused). eps has the source's length; eps_r at least max(left, right, source)."""
    src = _f32(src)
    ls = src.shape[-1]
    if left < 0 or right < 0 or left + right == 0:
        raise LofiError(INVALID_PARAMS, "extend needs a positive left and/or right extension",
                        {"field": "left_sec"})
    if ls + left + right > MAX_FRAMES:
        raise LofiError(INVALID_PARAMS, f"extending {ls} frames by {left}+{right} exceeds the "
                        f"model's {MAX_FRAMES} frames (240 s)", {"field": "right_sec"})
    if eps.shape[-1] != ls or eps_r.shape[-1] < max(left, right):
        raise ValueError("extend noise too short for the requested extension")
    pad = [(0, 0)] * (src.ndim - 1) + [(left, right)]
    x0 = np.pad(src, pad)
    mask = np.zeros_like(x0)
    mask[..., :left] = 1
    if right:
        mask[..., -right:] = 1
    parts = [eps_r[..., :left]] if left else []
    parts.append(eps)
    if right:
        parts.append(eps_r[..., -right:])
    z0 = np.concatenate([_f32(p) for p in parts], axis=-1)
    return RepaintPlan(x0, z0, mask, n_min(steps, variance), left, right)


def sample_repaint(engine, conditions: Conditions, plan: RepaintPlan, params: SamplerParams,
                   on_step: Callable[[int, int, dict], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None, trace=None) -> np.ndarray:
    """The repaint/extend loop (§12.2 step 4-5): skip i < first_step; start from the re-noised
    source; plain Euler with t/1000 (the scheduler's step and omega are never used, whatever
    scheduler_type says: only its timesteps are); re-pin the source outside the mask."""
    params.validate()
    record = _recorder(trace)
    n = params.infer_steps
    timesteps, _ = timesteps_sigmas(params.scheduler_type, n, SHIFT)
    evaluate = Evaluator(engine, conditions, params, n, record)
    x0, z0, keep = plan.x0, plan.z0, plan.mask == 1
    total = len(timesteps)
    x = None
    for i, t in enumerate(timesteps):
        if i < plan.first_step:
            continue
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        t_i = _F32(t) / _F32(1000)
        if x is None:
            # the reference computes zt_edit + zt_src - x0 with zt_edit = x0 (not bit-equal zt_src)
            x = (x0.copy() + ((_F32(1) - t_i) * x0 + t_i * z0)) - x0
        v, info = evaluate(x, t, i)
        t_next = _F32(timesteps[i + 1]) / _F32(1000) if i + 1 < total else _F32(0)
        x_new = x + (t_next - t_i) * v
        x_new = np.where(keep, x_new, (_F32(1) - t_next) * x0 + t_next * z0).astype(_F32)
        if record is not None:
            record({"event": "step", "index": i, "timestep": t, "sample": x, "model_output": v,
                    "out": x_new})
        x = x_new
        if on_step is not None:
            on_step(i, total, info)
    return plan.x0.copy() if x is None else x


def audio2audio_start(ref: np.ndarray, eps: np.ndarray, strength: float) -> np.ndarray:
    """x = ref*(1 - s) + eps*s with s = the capped scheduler's shifted sigma_max (0.75 for
    strength 0.5), although the first timestep sits at shift(s) (§12.4; reproduced)."""
    s = _F32(scheduler_bounds(SHIFT, 1.0 - strength)[0])
    return _f32(ref) * (_F32(1) - s) + _f32(eps) * s


# -- FlowEdit ----------------------------------------------------------------------------------

@dataclass
class EditConditions:
    """One side of FlowEdit: [cond; uncond] contexts stacked on the batch axis (uncond = zero
    text, zero lyric ids and zero lyric mask), with their own masks."""

    ctx: np.ndarray
    ctx_mask: np.ndarray


def edit_conditions(engine, text_hidden, text_mask, lyric_ids, lyric_mask) -> EditConditions:
    ids = np.concatenate([lyric_ids, np.zeros_like(lyric_ids)])
    lmask = np.concatenate([lyric_mask, np.zeros_like(lyric_mask)])
    text = np.concatenate([text_hidden, np.zeros_like(text_hidden)])
    ctx, mask = engine.encode_context(text, np.concatenate([text_mask, text_mask]), ids, lmask)
    return EditConditions(np.asarray(ctx, _F32), np.asarray(mask, _F32))


def _edit_velocity(engine, record, i, cond: EditConditions, x, t, scale, buffer):
    b = x.shape[0]
    v = _velocity(engine, record, i, np.concatenate([x, x]), np.full(2 * b, t, _F32), cond.ctx,
                  cond.ctx_mask, np.zeros(2 * b, dtype=bool))
    return apg(v[:b], v[b:], scale, buffer)


def sample_edit(engine, source: EditConditions, target: EditConditions, x_src: np.ndarray,
                steps: int, edit_n_min: float, edit_n_max: float, n_avg: int, noise,
                scheduler_type: str = "euler", guidance_scale: float = 15.0,
                on_step: Callable[[int, int, dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None, trace=None) -> np.ndarray:
    """FlowEdit (§12.5). `noise` supplies every draw in the reference's order (its retake
    generators): n_avg per edit step, one at i == n_max, pingpong's re-noising draws.
    Quirks kept: pingpong never applies its edit-branch sample (z stays, a draw is consumed);
    the i == n_max re-noising uses the scheduler sigma, everything else t/1000."""
    if not 0 <= edit_n_min <= edit_n_max <= 1:
        raise LofiError(INVALID_PARAMS, "edit needs 0 <= n_min <= n_max <= 1", {"field": "edit_n_min"})
    if isinstance(n_avg, bool) or not isinstance(n_avg, int) or not 1 <= n_avg <= 16:
        raise LofiError(INVALID_PARAMS, "edit_n_avg must be an integer from 1 to 16",
                        {"field": "edit_n_avg"})
    record = _recorder(trace)
    timesteps, sigmas = timesteps_sigmas("euler", steps, SHIFT)
    n0, n1 = int(steps * edit_n_min), int(steps * edit_n_max)
    pingpong = scheduler_type == "pingpong"
    x_src = _f32(x_src)
    z, y = x_src.copy(), None
    mom_src, mom_tar = MomentumBuffer(), MomentumBuffer()
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if i < n0:
            continue
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        t_i = _F32(t) / _F32(1000)
        t_next = _F32(timesteps[i + 1]) / _F32(1000) if i + 1 < total else _F32(0)
        if i < n1:
            delta = np.zeros_like(z)
            for _ in range(n_avg):
                eps = _f32(noise.randn(z.shape))
                z_src = (_F32(1) - t_i) * x_src + t_i * eps
                z_tar = z + z_src - x_src
                v_src = _edit_velocity(engine, record, i, source, z_src, t, guidance_scale, mom_src)
                v_tar = _edit_velocity(engine, record, i, target, z_tar, t, guidance_scale, None)
                delta = delta + _F32(1 / n_avg) * (v_tar - v_src)
            if pingpong:
                noise.randn(z.shape)  # drawn and discarded, as the reference does
            else:
                z = z + (t_next - t_i) * delta
        else:
            if i == n1:
                s = sigmas[i]
                y = z + (s * _f32(noise.randn(z.shape)) + (_F32(1) - s) * x_src) - x_src
            v = _edit_velocity(engine, record, i, target, y, t, guidance_scale, mom_tar)
            if pingpong:
                y = (_F32(1) - t_next) * (y - t_i * v) + t_next * _f32(noise.randn(y.shape))
            else:
                y = y + (t_next - t_i) * v
        if on_step is not None:
            on_step(i, total, {"timestep": float(t), "guided": True,
                               "guidance_scale": guidance_scale, "rows": 2 * x_src.shape[0]})
    return (z if y is None else y).astype(_F32)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=_F32)

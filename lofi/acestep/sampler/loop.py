"""The text2music denoising loop of ACE-Step v1 (spec §6.1), driving any Engine.

Branches of one guided evaluation (cond, [text-only], uncond) go to the engine as ONE stacked
velocity call; rows are independent in the DiT, so this matches the reference's separate calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from lofi.errors import INVALID_PARAMS, MODEL_INFERENCE_FAILED, Cancelled, LofiError
from lofi.acestep.sampler.guidance import (CFG_TYPES, MomentumBuffer, apg, cfg, cfg_double, cfg_star,
                       guidance_scale_at, guidance_window)
from lofi.acestep.sampler.schedules import SCHEDULERS, SHIFT, make_step, timesteps_sigmas

MAX_STEPS = 1000
MAX_SCALE = 100.0
MAX_OMEGA = 100.0


@dataclass
class SamplerParams:
    """Sampling knobs; defaults are those of the reference's ACEStepPipeline.__call__ (§11.1)."""

    infer_steps: int = 60
    guidance_scale: float = 15.0
    scheduler_type: str = "euler"
    cfg_type: str = "apg"
    omega_scale: float = 10.0
    guidance_interval: float = 0.5
    guidance_interval_decay: float = 0.0
    min_guidance_scale: float = 3.0
    use_erg_tag: bool = True
    use_erg_lyric: bool = True
    use_erg_diffusion: bool = True
    guidance_scale_text: float = 0.0
    guidance_scale_lyric: float = 0.0
    zero_steps: int = 1
    use_zero_init: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> SamplerParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LofiError(INVALID_PARAMS, f"unknown sampler parameter(s): {', '.join(unknown)}",
                            {"fields": unknown})
        return cls(**d)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale not in (0.0, 1.0)

    @property
    def double_condition(self) -> bool:
        return self.guidance_scale_text > 1.0 and self.guidance_scale_lyric > 1.0

    def validate(self) -> SamplerParams:
        def bad(name, allowed):
            value = getattr(self, name)
            raise LofiError(INVALID_PARAMS, f"{name} must be {allowed} (got {value!r})",
                            {"field": name, "value": value, "allowed": allowed})

        def number(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not math.isfinite(v) or not lo <= v <= hi:
                bad(name, f"a number in [{lo:g}, {hi:g}]")

        def integer(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(name, f"an integer in [{lo}, {hi}]")

        def choice(name, options):
            if getattr(self, name) not in options:
                bad(name, "one of " + ", ".join(options))

        integer("infer_steps", 1, MAX_STEPS)
        choice("scheduler_type", SCHEDULERS)
        choice("cfg_type", CFG_TYPES)
        for name in ("guidance_scale", "min_guidance_scale", "guidance_scale_text",
                     "guidance_scale_lyric"):
            number(name, 0.0, MAX_SCALE)
        number("omega_scale", -MAX_OMEGA, MAX_OMEGA)
        number("guidance_interval", 0.0, 1.0)
        number("guidance_interval_decay", 0.0, 1.0)
        integer("zero_steps", 0, MAX_STEPS)
        for name in ("use_erg_tag", "use_erg_lyric", "use_erg_diffusion", "use_zero_init"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        return self


@dataclass
class Conditions:
    """Encoded contexts [B, L, D]; every branch shares the conditional ctx_mask, as in reference."""

    ctx: np.ndarray
    ctx_mask: np.ndarray
    null_ctx: np.ndarray | None = None        # needed when guidance is on
    text_only_ctx: np.ndarray | None = None   # needed for double-condition guidance


def build_conditions(engine, text_hidden: np.ndarray, text_hidden_null: np.ndarray | None,
                     text_mask: np.ndarray, lyric_ids: np.ndarray, lyric_mask: np.ndarray,
                     params: SamplerParams) -> Conditions:
    """Encode the conditional, null and (double-condition) text-only contexts (spec §6.5-6.6).

    Null with use_erg_lyric: the ERG text embedding (zeros unless use_erg_tag) plus the lyrics
    through the ERG-hooked Conformer; without: zero text and zero lyric ids, no hooks.
    Contexts guidance will not use are not computed.
    """
    ctx, ctx_mask = engine.encode_context(text_hidden, text_mask, lyric_ids, lyric_mask,
                                          erg_lyric=False)
    cond = Conditions(np.asarray(ctx, np.float32), np.asarray(ctx_mask, np.float32))
    if not params.do_cfg:
        return cond
    zeros_text = np.zeros_like(text_hidden)
    if params.use_erg_lyric:
        null_text = text_hidden_null if (params.use_erg_tag and text_hidden_null is not None) \
            else zeros_text
        null, _ = engine.encode_context(null_text, text_mask, lyric_ids, lyric_mask,
                                        erg_lyric=True)
    else:
        null, _ = engine.encode_context(zeros_text, text_mask, np.zeros_like(lyric_ids),
                                        lyric_mask, erg_lyric=False)
    cond.null_ctx = np.asarray(null, np.float32)
    if params.double_condition:
        if params.use_erg_lyric:
            text_only, _ = engine.encode_context(text_hidden, text_mask, lyric_ids, lyric_mask,
                                                 erg_lyric=True)
        else:
            text_only, _ = engine.encode_context(text_hidden, text_mask,
                                                 np.zeros_like(lyric_ids), lyric_mask,
                                                 erg_lyric=False)
        cond.text_only_ctx = np.asarray(text_only, np.float32)
    return cond


def _recorder(trace):
    if trace is None:
        return None
    if isinstance(trace, list):
        return trace.append
    if callable(trace):
        return trace
    raise TypeError("trace must be a list, a callable or None")


def sample(engine, conditions: Conditions, noise_latents: np.ndarray, params: SamplerParams,
           noise_source=None, on_step: Callable[[int, int, dict], None] | None = None,
           should_cancel: Callable[[], bool] | None = None, trace=None,
           sigma_max: float = 1.0) -> np.ndarray:
    """Denoise noise_latents [B, 8, 16, T] into final latents (float32).

    noise_source: needed by pingpong (one N(0,1) draw of the latent shape per step).
    on_step(i, total, info): after every loop step; total = loop length (N, or 2N-1 for heun),
    info = {timestep, guided, guidance_scale, rows}. should_cancel(): polled before every
    evaluation; True raises Cancelled.
    trace: a list (dicts appended) or a callable receiving one dict per velocity call
    ("velocity"), guidance ("guidance") and scheduler step ("step").
    sigma_max < 1 (audio2audio, = 1 - strength) shortens the run to int(sigma_max * N) steps
    on the reference's sigma_max-capped schedule; mixing the start latent is the caller's job.
    """
    params.validate()
    record = _recorder(trace)
    n = params.infer_steps
    if sigma_max != 1.0:
        if not 0.0 < sigma_max < 1.0:
            raise LofiError(INVALID_PARAMS, f"sigma_max must be in (0, 1] (got {sigma_max!r})",
                            {"field": "sigma_max", "value": sigma_max})
        n = int(sigma_max * n)
        if n < 1:
            raise LofiError(INVALID_PARAMS, "audio2audio leaves no step: raise infer_steps or "
                            "lower the reference strength", {"field": "infer_steps"})
    timesteps, sigmas = timesteps_sigmas(params.scheduler_type, n, SHIFT, sigma_max)
    step = make_step(params.scheduler_type, sigmas, params.omega_scale, noise_source)

    # heun quirk: the window comes from n but is indexed by the evaluation counter (0..2n-2)
    evaluate = Evaluator(engine, conditions, params, n, record)
    x = np.array(noise_latents, dtype=np.float32)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        v, info = evaluate(x, t, i)
        x_new = step(v, x, i)
        if record is not None:
            record({"event": "step", "index": i, "timestep": t, "sample": x,
                    "model_output": v, "out": x_new})
        x = x_new
        if not np.isfinite(x).all():  # overflow (e.g. fp16) must stop the job, not decode noise
            raise LofiError(MODEL_INFERENCE_FAILED, f"non-finite latent after sampler step {i + 1} "
                            f"of {total} (precision {getattr(engine, 'precision', '?')})",
                            {"step": i + 1, "precision": getattr(engine, "precision", None)})
        if on_step is not None:
            on_step(i, total, info)
    return x


class Evaluator:
    """The (guided) velocity of loop index i, as every text2music-family loop computes it.

    The guidance window comes from n (the step count the reference computes it from) and is
    indexed by the absolute loop index i; the APG momentum lives across the calls of one run.
    """

    def __init__(self, engine, conditions: Conditions, params: SamplerParams, n: int, record=None):
        self.engine, self.conditions, self.params, self.record = engine, conditions, params, record
        self.start, self.end = guidance_window(n, params.guidance_interval)
        self.double = params.double_condition
        if params.do_cfg and conditions.null_ctx is None:
            raise ValueError("guidance is on but the conditions carry no null context")
        if params.do_cfg and self.double and conditions.text_only_ctx is None:
            raise ValueError("double-condition guidance needs the text-only context")
        self.momentum = MomentumBuffer()

    def __call__(self, x: np.ndarray, t, i: int) -> tuple[np.ndarray, dict]:
        params, conditions, record = self.params, self.conditions, self.record
        b = x.shape[0]
        mask = conditions.ctx_mask
        guided = params.do_cfg and self.start <= i < self.end
        if not guided:
            v = _velocity(self.engine, record, i, x, np.full(b, t, np.float32), conditions.ctx,
                          mask, np.zeros(b, dtype=bool))
            return v, {"timestep": float(t), "guided": False, "guidance_scale": None, "rows": b}
        branches = [conditions.ctx]
        if self.double:
            branches.append(conditions.text_only_ctx)
        branches.append(conditions.null_ctx)
        k = len(branches)
        erg = np.zeros(k * b, dtype=bool)
        erg[(k - 1) * b:] = params.use_erg_diffusion
        v_all = _velocity(self.engine, record, i, np.concatenate([x] * k),
                          np.full(k * b, t, np.float32), np.concatenate(branches),
                          np.concatenate([mask] * k), erg)
        rows = [v_all[j * b:(j + 1) * b] for j in range(k)]
        v_c, v_u = rows[0], rows[-1]
        gs = guidance_scale_at(i, self.start, self.end, params.guidance_scale,
                               params.min_guidance_scale, params.guidance_interval_decay)
        if self.double:
            kind = "cfg_double"
            v = cfg_double(v_c, v_u, rows[1], params.guidance_scale_text,
                           params.guidance_scale_lyric)
        elif params.cfg_type == "apg":
            kind = "apg"
            v = apg(v_c, v_u, gs, self.momentum)
        elif params.cfg_type == "cfg":
            kind = "cfg"
            v = cfg(v_c, v_u, gs)
        else:
            kind = "cfg_star"
            v = cfg_star(v_c, v_u, gs, i, params.zero_steps, params.use_zero_init)
        if record is not None:
            record({"event": "guidance", "index": i, "kind": kind, "scale": gs,
                    "cond": v_c, "uncond": v_u, "text_only": rows[1] if self.double else None,
                    "out": v,
                    "momentum": self.momentum.running_average if kind == "apg" else None})
        return v, {"timestep": float(t), "guided": True, "guidance_scale": gs, "rows": k * b}


def _velocity(engine, record, i, x, t, ctx, mask, erg):
    out = np.asarray(engine.velocity(x, t, ctx, mask, erg), dtype=np.float32)
    if out.shape != x.shape:
        raise LofiError(MODEL_INFERENCE_FAILED,
                        f"engine velocity returned shape {out.shape}, expected {x.shape}")
    if record is not None:
        record({"event": "velocity", "index": i, "x": x, "timestep": t, "ctx": ctx,
                "ctx_mask": mask, "erg": erg, "out": out})
    return out

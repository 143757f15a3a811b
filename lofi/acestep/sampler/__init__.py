"""Engine-agnostic sampler (numpy only): schedules, guidance, noise and the denoising loop.

Never imports mlx, onnxruntime or torch: both engines are driven through lofi.engine.
"""

from lofi.acestep.sampler.guidance import (CFG_TYPES, MomentumBuffer, apg, cfg, cfg_double, cfg_star,
                       guidance_scale_at, guidance_window)
from lofi.acestep.sampler.loop import Conditions, SamplerParams, build_conditions, sample
from lofi.acestep.sampler.noise import InjectedNoise, NoiseSource, SeededNoise, random_seed
from lofi.acestep.sampler.schedules import (SCHEDULERS, SHIFT, EulerStep, HeunStep, PingPongStep, make_step,
                        omega_rescale, scheduler_bounds, timesteps_sigmas)

__all__ = [
    "CFG_TYPES", "SCHEDULERS", "SHIFT", "Conditions", "EulerStep", "HeunStep", "InjectedNoise",
    "MomentumBuffer", "NoiseSource", "PingPongStep", "SamplerParams", "SeededNoise", "apg",
    "build_conditions", "cfg", "cfg_double", "cfg_star", "guidance_scale_at", "guidance_window",
    "make_step", "omega_rescale", "random_seed", "sample", "scheduler_bounds", "timesteps_sigmas",
]

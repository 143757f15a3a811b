"""A generation request, validated before anything loads. No ML framework imports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from lofi import MODEL_VERSION
from lofi.errors import INVALID_DURATION, INVALID_PARAMS, LofiError

MIN_DURATION, MAX_DURATION = 5.0, 240.0
SCHEDULERS = ("euler", "heun", "pingpong")
CFG_TYPES = ("apg", "cfg", "cfg_star")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: bf16 on GPUs, fp32 on CPUs
FORMATS = ("wav", "flac")
SAMPLE_RATE = 48000


@dataclass
class GenerateParams:
    prompt: str
    duration_sec: float
    infer_steps: int = 27
    guidance_scale: float = 15.0
    scheduler: str = "euler"
    cfg_type: str = "apg"
    omega_scale: float = 10.0
    seed: int | None = None
    guidance_interval: float = 0.5
    guidance_interval_decay: float = 0.0
    min_guidance_scale: float = 3.0
    use_erg_tag: bool = True
    use_erg_lyric: bool = True
    use_erg_diffusion: bool = True
    # "[inst]": the reference UI's instrumental tag (its empty lyrics tend to give vocals)
    lyrics: str = "[inst]"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> "GenerateParams":
        def bad(field, msg):
            raise LofiError(INVALID_PARAMS, f"{field}: {msg}", {"field": field})

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            bad("prompt", "must be a non-empty string (1-1000 characters)")
        if len(self.prompt) > 1000:
            bad("prompt", f"is {len(self.prompt)} characters; at most 1000 are allowed")
        d = self.duration_sec
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (MIN_DURATION <= d <= MAX_DURATION):
            raise LofiError(INVALID_DURATION, f"duration_sec must be between {MIN_DURATION:g} and "
                            f"{MAX_DURATION:g} seconds, got {d!r}", {"field": "duration_sec"})
        if isinstance(self.infer_steps, bool) or not isinstance(self.infer_steps, int) \
                or not 1 <= self.infer_steps <= 200:
            bad("infer_steps", f"must be an integer from 1 to 200, got {self.infer_steps!r}")
        _num(self.guidance_scale, "guidance_scale", 0.0, 100.0, bad)
        _num(self.omega_scale, "omega_scale", 0.0, 100.0, bad)
        _num(self.guidance_interval, "guidance_interval", 0.0, 1.0, bad)
        _num(self.guidance_interval_decay, "guidance_interval_decay", 0.0, 1.0, bad)
        _num(self.min_guidance_scale, "min_guidance_scale", 0.0, 100.0, bad)
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.cfg_type not in CFG_TYPES:
            bad("cfg_type", f"must be one of {', '.join(CFG_TYPES)}, got {self.cfg_type!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):  # 64-bit: lofi.nvim's range
            bad("seed", f"must be an integer from 0 to {2**64 - 1} or null, got {self.seed!r}")
        if not isinstance(self.lyrics, str) or self.lyrics not in ("[inst]", ""):
            bad("lyrics", "only \"[inst]\" (instrumental, the default) or \"\" (the reference's "
                f"empty-lyrics path) are supported for now, got {str(self.lyrics)[:40]!r}")
        for f in ("use_erg_tag", "use_erg_lyric", "use_erg_diffusion"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be true or false")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def track_id(self, engine: str, precision: str) -> str:
        """Hash of everything that changes the audio (the seed must be set)."""
        key = dict(self.to_dict(), engine=engine, precision=precision, model=MODEL_VERSION)
        for f in fields(self):  # 15 and 15.0 are the same request
            if f.type in ("float", float) and not isinstance(key[f.name], bool):
                key[f.name] = float(key[f.name])
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _num(v, field, lo, hi, bad):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        bad(field, f"must be a number from {lo:g} to {hi:g}, got {v!r}")

"""A MusicGen request, validated before anything loads, and the parameters each backend refuses.

MusicGen shares prompt, duration, seed and guidance with ACE-Step; the diffusion parameters
(steps, scheduler, CFG type, omega, guidance interval, ERG) are ACE-Step's only, top_k and
temperature MusicGen's only. A parameter given to the wrong backend is INVALID_PARAMS naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from lofi.errors import INVALID_DURATION, INVALID_PARAMS, LofiError

MIN_DURATION, MAX_DURATION = 5.0, 120.0
SHARED = ("prompt", "duration_sec", "seed", "guidance_scale")


@dataclass
class MusicgenParams:
    prompt: str
    duration_sec: float
    seed: int | None = None
    guidance_scale: float | None = None   # None: the checkpoint's generation config (3.0)
    top_k: int | None = None              # None: 250 unless the generation config says otherwise
    temperature: float = 1.0

    # what the daemon's job view and progress show as steps: one per decoder call
    scheduler = "tokens"

    @property
    def infer_steps(self) -> int:
        from lofi.musicgen.windows import CONTEXT_SEC, WINDOW_SEC, plan, total_frames
        frames = total_frames(float(self.duration_sec), 50)
        wins = plan(frames, int(WINDOW_SEC * 50), int(CONTEXT_SEC * 50))
        return sum(w.new + 3 for w in wins)  # musicgen-small: 50 frames/s, 4 codebooks

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> "MusicgenParams":
        def bad(field, msg):
            raise LofiError(INVALID_PARAMS, f"{field}: {msg}", {"field": field})

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            bad("prompt", "must be a non-empty string (1-1000 characters)")
        if len(self.prompt) > 1000:
            bad("prompt", f"is {len(self.prompt)} characters; at most 1000 are allowed")
        d = self.duration_sec
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not MIN_DURATION <= d <= MAX_DURATION:
            raise LofiError(INVALID_DURATION, f"duration_sec must be between {MIN_DURATION:g} and "
                            f"{MAX_DURATION:g} seconds for MusicGen, got {d!r}", {"field": "duration_sec"})
        g = self.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 100):
            bad("guidance_scale", f"must be a number from 0 to 100, got {g!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 2048):
            bad("top_k", f"must be an integer from 1 to 2048, got {k!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.05 <= t <= 10:
            bad("temperature", f"must be a number from 0.05 to 10, got {t!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**32):
            bad("seed", f"must be an integer from 0 to {2**32 - 1} or null, got {self.seed!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def track_id(self, engine: str, precision: str, model: str = "musicgen") -> str:
        key = dict(self.to_dict(), engine=engine, precision=precision, model=model, backend="musicgen")
        for f in ("duration_sec", "guidance_scale", "temperature"):
            if key[f] is not None:
                key[f] = float(key[f])
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def foreign_params(backend: str, given) -> list[str]:
    """The names in `given` that belong only to the other backend."""
    from lofi.params import GenerateParams
    ace = set(GenerateParams.field_names()) - set(SHARED)
    mg = set(MusicgenParams.field_names()) - set(SHARED)
    other = ace if backend == "musicgen" else mg
    return sorted(k for k in given if k in other)


def refuse_foreign(backend: str, given) -> None:
    bad = foreign_params(backend, given)
    if bad:
        other = "ACE-Step" if backend == "musicgen" else "MusicGen"
        raise LofiError(INVALID_PARAMS, f"{', '.join(bad)}: {other}-only parameter"
                        f"{'s' if len(bad) > 1 else ''}, not accepted by the {backend} backend",
                        {"field": bad[0], "fields": bad, "backend": backend})

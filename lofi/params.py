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
TASKS = ("text2music", "retake", "repaint", "extend", "audio2audio", "edit")
SOURCE_TASKS = ("repaint", "extend", "audio2audio", "edit")


@dataclass
class GenerateParams:
    prompt: str
    duration_sec: float | None = None  # source tasks: set from the source by resolve_source
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
    # audio-input modes (spec §12); see lofi.acestep.tasks
    task: str = "text2music"
    src_audio: str | None = None         # file path or cached track id (source tasks)
    retake_seed: int | None = None       # retake/repaint/extend: the second noise
    retake_variance: float = 0.5
    start_sec: float | None = None       # repaint window
    end_sec: float | None = None
    left_sec: float = 0.0                # extend
    right_sec: float = 0.0
    strength: float = 0.5                # audio2audio: how much of the source is kept
    target_prompt: str | None = None     # edit
    edit_n_min: float = 0.0
    edit_n_max: float = 1.0
    edit_n_avg: int = 1
    lora: str | None = None              # name under $LOFI_HOME/lora/ or a folder
    lora_weight: float = 1.0
    src_sha256: str | None = None        # set by resolve_source (cache key), never by callers
    lora_sha256: str | None = None       # set by resolve_lora

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
        if self.task not in TASKS:
            bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        d = self.duration_sec
        if self.task in SOURCE_TASKS:
            _source_fields(self, bad)
        elif isinstance(d, bool) or not isinstance(d, (int, float)) or not (MIN_DURATION <= d <= MAX_DURATION):
            raise LofiError(INVALID_DURATION, f"duration_sec must be between {MIN_DURATION:g} and "
                            f"{MAX_DURATION:g} seconds, got {d!r}", {"field": "duration_sec"})
        elif self.src_audio is not None:
            bad("src_audio", f"does not apply to task {self.task} (use repaint, extend, "
                "audio2audio or edit)")
        if self.retake_seed is not None and (isinstance(self.retake_seed, bool) or not isinstance(
                self.retake_seed, int) or not 0 <= self.retake_seed < 2**32):
            bad("retake_seed", f"must be an integer from 0 to {2**32 - 1} or null")
        _num(self.retake_variance, "retake_variance", 0.0, 1.0, bad)
        _num(self.lora_weight, "lora_weight", -4.0, 4.0, bad)
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora.strip()):
            bad("lora", "must be an adapter name, a folder, or null")
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
            if "float" in str(f.type) and isinstance(key[f.name], int) \
                    and not isinstance(key[f.name], bool):
                key[f.name] = float(key[f.name])
        if self.src_audio is not None:  # the content, not the path, makes the track
            key["src_audio"] = None
            key.pop("src_sha256")
            key["source"] = self.src_sha256
        if self.lora is not None:
            key["lora"] = self.lora_sha256
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _source_fields(p: GenerateParams, bad) -> None:
    """Source tasks: what can be checked without reading the file (resolve_source does the rest)."""
    if not isinstance(p.src_audio, str) or not p.src_audio.strip():
        bad("src_audio", f"task {p.task} needs a source: a file path or a cached track id")
    if p.task == "repaint":
        for f in ("start_sec", "end_sec"):
            _num(getattr(p, f), f, 0.0, MAX_DURATION, bad)
        if p.end_sec <= p.start_sec:
            bad("end_sec", f"must be after start_sec ({p.start_sec} s), got {p.end_sec} s")
    elif p.task == "extend":
        _num(p.left_sec, "left_sec", 0.0, MAX_DURATION, bad)
        _num(p.right_sec, "right_sec", 0.0, MAX_DURATION, bad)
        if p.left_sec + p.right_sec <= 0:
            bad("right_sec", "extend needs left_sec and/or right_sec above 0")
    elif p.task == "audio2audio":
        _num(p.strength, "strength", 0.0, 1.0, bad)
        if not 0.0 < p.strength < 1.0 or int((1.0 - p.strength) * p.infer_steps) < 1:
            bad("strength", f"leaves no diffusion step at {p.infer_steps} steps: use a strength "
                "in (0, 1) with at least one step of (1 - strength) * infer_steps")
    elif p.task == "edit":
        if not isinstance(p.target_prompt, str) or not p.target_prompt.strip() \
                or len(p.target_prompt) > 1000:
            bad("target_prompt", "edit needs a target prompt of 1-1000 characters")
        _num(p.edit_n_min, "edit_n_min", 0.0, 1.0, bad)
        _num(p.edit_n_max, "edit_n_max", 0.0, 1.0, bad)
        if p.edit_n_max < p.edit_n_min:
            bad("edit_n_max", "must not be below edit_n_min")
        if isinstance(p.edit_n_avg, bool) or not isinstance(p.edit_n_avg, int) \
                or not 1 <= p.edit_n_avg <= 16:
            bad("edit_n_avg", "must be an integer from 1 to 16")


def _num(v, field, lo, hi, bad):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        bad(field, f"must be a number from {lo:g} to {hi:g}, got {v!r}")

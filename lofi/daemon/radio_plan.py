"""The radio's plan: its strategies, what each track is asked for, and radio_start's checked
configuration (lofi/daemon/radio.py runs it)."""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field

from lofi.errors import INVALID_DURATION, INVALID_PARAMS, LofiError
from lofi.mix import WAIT_MODES
from lofi.params import MAX_DURATION, GenerateParams

PRESETS = (
    "lofi hip hop, jazzy piano, vinyl crackle, mellow drums, 80 bpm",
    "chillhop, warm rhodes, soft boom bap, rain ambience, 85 bpm",
    "ambient lofi, dreamy pads, tape hiss, slow tempo, 70 bpm",
    "lofi jazz, upright bass, brushed drums, muted trumpet, 90 bpm",
    "lofi beats, nylon guitar, lazy swing, cassette warmth, 75 bpm",
)
STRATEGIES = ("same_prompt", "preset_cycle", "random_preset", "continue")
CONTEXT_SEC = 20.0  # default context_sec: how much of the playing track a continuation hears
JOIN_SEC = 0.25
SR = 48000
BACKEND = "ace-step"  # the radio's parameters and modes are ACE-Step's
DEFAULT_DURATION = 120.0
DEFAULT_CROSSFADE = 4.0
MAX_FAILURES = 3  # generation failures in a row before the radio gives up
RADIO_SEQ = 1 << 60  # queue order: behind every normal job a user sends, ahead of none
EARLY_MARGIN = 1.25  # the estimated generation time is stretched by this before comparing

# the source-task fields are the `continue` strategy's to set
_OWN = ("prompt", "duration_sec", "seed", "task", "src_audio", "src_sha256", "retake_seed",
        "start_sec", "end_sec", "left_sec", "right_sec", "target_prompt", "strength",
        "edit_n_min", "edit_n_max", "edit_n_avg", "lora_sha256")
_GEN = [f for f in GenerateParams.field_names() if f not in _OWN]
_TYPES = {f: ((bool,) if isinstance(getattr(GenerateParams, f, None), bool) else
              (str,) if isinstance(getattr(GenerateParams, f, None), str) else
              (int,) if f == "infer_steps" else (int, float)) for f in _GEN}
SPEC = dict({f: (_TYPES[f], False) for f in _GEN},
            prompt=((str,), False), prompts=((list,), False), strategy=((str,), False),
            duration_sec=((int, float), False), crossfade_sec=((int, float), False),
            wait_mode=((str,), False), volume=((int, float), False), seed=((int,), False),
            context_sec=((int, float), False))


def _bad(name: str, message: str) -> LofiError:
    return LofiError(INVALID_PARAMS, message, {"field": name})


class Strategy:
    """What each track is asked for: its prompt (the radio adds `continue`'s extend fields)."""


    def __init__(self, name: str, prompts: list[str]):
        self.name, self.prompts = name, prompts
        self._rng = random.Random(secrets.randbits(64))

    def request(self, index: int, previous: "Entry | None") -> dict:
        """GenerateParams fields of track `index` beyond the radio's shared ones."""
        return {"prompt": self.prompt(index, previous.prompt if previous else None)}

    def prompt(self, index: int, previous: str | None) -> str:
        if self.name == "same_prompt":
            return self.prompts[0]
        if self.name in ("preset_cycle", "continue"):
            return self.prompts[index % len(self.prompts)]
        choices = [p for p in self.prompts if p != previous] or self.prompts
        return self._rng.choice(choices)


@dataclass
class Entry:
    index: int
    prompt: str
    seed: int
    track_id: str = ""
    path: str | None = None
    token: str = ""
    requested_at: float = 0.0
    gen_sec: float | None = None
    started_at: float | None = None
    start_frame: int | None = None
    kept: bool = False
    offset: int = 0  # frames of the file before what is played (a continuation's context)
    tail: str | None = None  # the context file this entry's job reads (ours, removed after)
    job: object = field(default=None, repr=False)

    def public(self) -> dict:
        return {"track_id": self.track_id, "path": self.path, "index": self.index,
                "prompt": self.prompt, "seed": self.seed, "kept": self.kept}


def parse(params: dict) -> dict:
    """radio_start's params -> a checked configuration (raises INVALID_PARAMS)."""
    strategy = params.get("strategy", "same_prompt")
    if strategy not in STRATEGIES:
        raise _bad("strategy", f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    prompts = params.get("prompts")
    if prompts is not None and (not prompts or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise _bad("prompts", "prompts must be a non-empty list of non-empty strings")
    prompt = params.get("prompt")
    if strategy in ("same_prompt", "continue") and prompt is not None:
        prompts = [prompt]
    elif strategy == "same_prompt":
        prompts = [prompt] if prompt is not None else (prompts[:1] if prompts else None)
        if not prompts:
            raise _bad("prompt", "strategy same_prompt needs a prompt")
    else:
        prompts = list(prompts or ([prompt] if prompt else []) or PRESETS)
    crossfade = float(params.get("crossfade_sec", DEFAULT_CROSSFADE))
    duration = float(params.get("duration_sec", DEFAULT_DURATION))
    context = float(params.get("context_sec", CONTEXT_SEC))
    if "context_sec" in params and strategy != "continue":
        raise _bad("context_sec", "context_sec applies to strategy continue only")
    if strategy == "continue":
        if not 1 <= context <= duration / 2:
            raise _bad("context_sec", f"context_sec must be from 1 to half of duration_sec "
                       f"({duration / 2:g}), got {context:g}")
        if duration + context > MAX_DURATION:
            raise LofiError(INVALID_DURATION, f"strategy continue extends context_sec "
                            f"({context:g} s) of the track before by duration_sec: at most "
                            f"{MAX_DURATION - context:g} s, got {duration:g}", {"field": "duration_sec"})
    if strategy == "continue":
        crossfade = JOIN_SEC  # tracks are one piece: joined, not crossfaded (crossfade_sec unused)
    elif not 0 <= crossfade <= 30:
        raise _bad("crossfade_sec", f"crossfade_sec must be from 0 to 30, got {crossfade:g}")
    elif crossfade > duration / 2:
        raise _bad("crossfade_sec", f"crossfade_sec ({crossfade:g}) must be at most half of "
                   f"duration_sec ({duration:g})")
    wait_mode = params.get("wait_mode", "loop")
    if wait_mode not in WAIT_MODES:
        raise _bad("wait_mode", f"wait_mode must be one of {', '.join(WAIT_MODES)}, got {wait_mode!r}")
    base = {f: params[f] for f in _GEN if f in params}
    seed = params.get("seed")
    for p in prompts:  # every generation parameter is checked now, not at the third track
        GenerateParams(prompt=p, duration_sec=duration, seed=seed, **base).validate()
    return {"strategy": Strategy(strategy, prompts), "crossfade_sec": crossfade,
            "duration_sec": duration, "wait_mode": wait_mode, "base": base, "seed": seed,
            "context_sec": context}

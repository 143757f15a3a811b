"""Beyond one window (30 s, MusicGen's training length): token-level continuation.

The first window generates up to WINDOW_SEC from the text alone. Each later window is prompted
with the last CONTEXT_SEC of codes generated so far (fed to the decoder after the BOS column, as
transformers feeds an audio prompt's codes) and generates up to WINDOW_SEC - CONTEXT_SEC new
frames; only the new frames are kept. The result is one code sequence, decoded by EnCodec in a
single pass, so no seam, gap or crossfade exists at a window boundary.

45 s with the defaults: window 1 = frames [0, 1500) (30 s), window 2 = prompt [1000, 1500)
(10 s) + new [1500, 2250) (15 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lofi.musicgen.sampler import SamplingParams, decode_loop, undelay

WINDOW_SEC = 30.0
CONTEXT_SEC = 10.0


@dataclass(frozen=True)
class Window:
    start: int    # first new frame (absolute)
    prompt: int   # prompt frames before it (taken from the codes so far)
    new: int      # frames generated


def plan(total: int, window: int, context: int) -> list[Window]:
    """Windows covering `total` frames: the first takes `window`, the rest `window - context`."""
    if not 0 <= context < window:
        raise ValueError("the context must be shorter than the window")
    out, have = [], 0
    while have < total:
        prompt = min(context, have)
        new = min(total - have, window - prompt)
        out.append(Window(have, prompt, new))
        have += new
    return out


def window_frames(frame_rate: int, max_positions: int, delays: int,
                  window_sec: float = WINDOW_SEC, context_sec: float = CONTEXT_SEC) -> tuple[int, int]:
    """(window, context) in frames, the window capped so its positions fit the decoder's table."""
    window = min(int(round(window_sec * frame_rate)), max_positions - delays)
    return window, min(int(round(context_sec * frame_rate)), window - 1)


def generate_codes(session_for: Callable[[], Callable], rows: int, total: int, num_codebooks: int,
                   audio_channels: int, pad: int, params: SamplingParams, choose,
                   window: int, context: int, on_step=None, should_cancel=None,
                   on_window=None) -> np.ndarray:
    """Codes [rows, total] for rows = B*K. `session_for()` gives a fresh KV-cached decoder call
    (text states fixed by the caller); `choose` draws tokens (one seeded stream for all windows)."""
    d = num_codebooks // audio_channels
    wins = plan(total, window, context)
    steps_total = sum(w.new + d - 1 for w in wins)
    done = 0
    codes = np.empty((rows, 0), np.int64)
    for w in wins:
        prefix = np.concatenate([np.full((rows, 1), pad, np.int64), codes[:, w.start - w.prompt:w.start]],
                                axis=1)
        if on_window is not None:
            on_window(w, prefix)

        def step(i, n, base=done):
            if on_step is not None:
                on_step(base + i, steps_total)

        seq = decode_loop(session_for(), prefix, w.new, num_codebooks, audio_channels, pad, params,
                          choose, on_step=step, should_cancel=should_cancel)
        new = undelay(seq, w.new, num_codebooks, audio_channels, start=w.prompt)
        codes = np.concatenate([codes, new], axis=1)
        done += w.new + d - 1
    return codes


def total_frames(seconds: float, frame_rate: int) -> int:
    return max(1, math.ceil(seconds * frame_rate - 1e-9))

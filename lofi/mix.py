"""The radio's mix: one track after another with equal-power crossfades, sample-accurate.

Pure numpy and deterministic, so tests can rebuild the exact expected stream. A crossfade of N
frames from track A into track B starts N frames before A's end; output frame k of the window is
    A[len(A) - N + k] * cos(pi/2 * k/N) + B[k] * sin(pi/2 * k/N),    k = 0 .. N-1
(the two gains' squares sum to 1: constant power for uncorrelated music). With curve "linear"
the gains are 1 - k/N and k/N instead (constant amplitude: for joining two decodes of the same
music, which are correlated and would swell by 3 dB under equal power). N = 0 is a butt join:
B's first frame follows A's last. When A reaches its crossfade point and nothing is queued, the
mix either loops A (crossfading A's tail into its own start, so the seam is as smooth as any
transition) or holds (plays A out, then silence); a track queued meanwhile crossfades in at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

WAIT_MODES = ("loop", "hold")
CURVES = ("power", "linear")


@dataclass
class Voice:
    token: str
    data: np.ndarray  # (frames, channels) float32
    pos: int = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> np.ndarray:
        """The next n frames, zero-padded past the end."""
        a = self.data[self.pos:self.pos + n]
        self.pos += n
        if len(a) < n:
            a = np.concatenate([a, np.zeros((n - len(a), self.data.shape[1]), np.float32)])
        return a


class Mixer:
    """render(n) -> (frames, events). Events are tuples, each with the output frame it happened at:
    ("started", token, frame)  a track's first frame is in the output (the start of its fade-in)
    ("looped", token, frame)   nothing was queued at the crossfade point: the track starts over
    ("waiting", token, frame)  the mix is waiting for a track (looping, holding or a skip pending)
    ("ended", token, frame)    a track's last frame has been output (its fade-out is complete)
    Not thread-safe: the owner serialises calls (the player process holds one lock)."""

    def __init__(self, channels: int = 2, crossfade_frames: int = 0, wait_mode: str = "loop",
                 curve: str = "power"):
        if wait_mode not in WAIT_MODES:
            raise ValueError(f"wait_mode must be one of {', '.join(WAIT_MODES)}")
        if curve not in CURVES:
            raise ValueError(f"curve must be one of {', '.join(CURVES)}")
        self.curve = curve
        self.channels = channels
        self.crossfade = max(0, int(crossfade_frames))
        self.wait_mode = wait_mode
        self.upcoming: deque[Voice] = deque()
        self.cur: Voice | None = None
        self.old: Voice | None = None  # fading out
        self.fade_k = self.fade_n = 0
        self.fade_loop = False
        self.skip_pending = False
        self.waiting = False
        self.frame = 0  # output frames rendered so far

    # -- control --------------------------------------------------------------------------------
    def enqueue(self, token: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != self.channels or len(data) == 0:
            raise ValueError(f"expected (frames, {self.channels}) audio, got {data.shape}")
        self.upcoming.append(Voice(token, data))

    def skip(self) -> None:
        """Crossfade to the next queued track now, or as soon as one is queued."""
        self.skip_pending = True

    def clear(self) -> None:
        self.upcoming.clear()
        self.cur = self.old = None
        self.skip_pending = self.waiting = False

    @property
    def current(self) -> str | None:
        return self.cur.token if self.cur is not None else None

    # -- rendering ------------------------------------------------------------------------------
    def render(self, n: int) -> tuple[np.ndarray, list[tuple]]:
        out = np.zeros((n, self.channels), np.float32)
        events: list[tuple] = []
        i = 0
        while i < n:
            at = self.frame + i
            if self.old is not None:  # inside a crossfade
                m = min(n - i, self.fade_n - self.fade_k)
                k = (self.fade_k + np.arange(m, dtype=np.float64))[:, None] * (np.pi / 2 / self.fade_n)
                a, b = self.old.take(m), self.cur.take(m)
                if self.curve == "linear":
                    t = (k * (2 / np.pi)).astype(np.float32)
                    out[i:i + m] = a * (1 - t) + b * t
                else:
                    out[i:i + m] = a * np.cos(k).astype(np.float32) + b * np.sin(k).astype(np.float32)
                self.fade_k += m
                i += m
                if self.fade_k == self.fade_n:
                    if not self.fade_loop:
                        events.append(("ended", self.old.token, self.frame + i))
                    self.old = None
                continue
            if self.cur is None:
                if not self.upcoming:
                    break  # silence
                self._start(self.upcoming.popleft(), at, events, fade=False)
                continue
            cur = self.cur
            point = len(cur.data) - self._fade_len(cur, None)  # where the crossfade out begins
            if self.upcoming and (self.skip_pending or self.waiting or cur.pos >= point):
                self._start(self.upcoming.popleft(), at, events, fade=True)
                continue
            if self.skip_pending and not self.waiting:
                self._wait(events, at)
            if cur.pos < point:
                m = min(n - i, point - cur.pos)
                out[i:i + m] = cur.take(m)
                i += m
                continue
            # at the crossfade point with nothing queued
            self._wait(events, at)
            if self.wait_mode == "loop":
                self._start(Voice(cur.token, cur.data), at, events, fade=True, loop=True)
                continue
            if cur.left > 0:  # hold: play the track out, then silence
                m = min(n - i, cur.left)
                out[i:i + m] = cur.take(m)
                i += m
                continue
            events.append(("ended", cur.token, at))
            self.cur = None
            break
        self.frame += n
        return out, events

    def _fade_len(self, out_voice: Voice, in_voice: Voice | None) -> int:
        """The crossfade, shortened where a track is too short for it (at most half a track)."""
        n = min(self.crossfade, len(out_voice.data) // 2)
        if in_voice is not None:
            n = min(n, out_voice.left, len(in_voice.data) // 2)
        return max(0, n)

    def _wait(self, events, at) -> None:
        if not self.waiting:
            self.waiting = True
            events.append(("waiting", self.cur.token if self.cur else None, at))

    def _start(self, voice: Voice, at: int, events: list, fade: bool, loop: bool = False) -> None:
        events.append(("looped" if loop else "started", voice.token, at))
        if not loop:
            self.waiting = self.skip_pending = False
        prev = self.cur
        self.cur = voice
        n = self._fade_len(prev, voice) if (fade and prev is not None) else 0
        if n > 0:
            self.old, self.fade_k, self.fade_n, self.fade_loop = prev, 0, n, loop
        elif prev is not None and prev is not voice:
            if not loop:
                events.append(("ended", prev.token, at))

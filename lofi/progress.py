"""Progress by the clock, shared by the daemon and `lofi generate`.

A job is a chain of segments: `text` (text encoding), `first_step` (loading the DiT, the
conditions and the first diffusion step), the remaining diffusion steps (`step`: one DiT row,
`guided`: the conditional and unconditional rows together, inside the guidance window), `dcae`,
`vocoder` and `writing`. `percent` = elapsed / (elapsed + estimated remaining), so it follows the wall clock,
not fixed stage weights (the decoders are a third of the job on a CPU).

Estimates come from, in order: the running job's own step time; the segment times of earlier
jobs with the same backend, engine, device, precision and model (kept in
`$LOFI_HOME/estimates.json`, so a restarted daemon estimates like a warm one), scaled by how much
faster or slower this job's steps run than theirs did (a busy machine slows every stage); and on
a first-ever job the stage cost model below. No ML framework here.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import statistics
import threading
import time
from pathlib import Path

log = logging.getLogger("lofi.progress")

SEGMENTS = ("text", "first_step", "step", "guided", "dcae", "vocoder", "writing")
SIZE_BOUND = ("step", "guided", "dcae", "vocoder", "writing")  # grow with the audio length
# Stage cost model for a first-ever job: each decoder's time in unguided DiT steps of the same
# job (MLX on CPU: tiny checkpoint, 60 s: DCAE ~5, vocoder ~12; full size, 30 s: ~4 and ~11).
# A pipeline that knows its networks' sizes gives its own (lofi.acestep.costs); writing
# (resample + 16-bit file) goes per audio second.
COST_MODEL = {"dcae": 4.0, "vocoder": 10.0}
GUIDED_COST = 1.8  # a guided step against an unguided one until both were measured (CPU: 1.7-2)
WRITE_PER_AUDIO_SEC = 0.006
WINDOW = 8  # observations kept per segment and key
FILE_NAME = "estimates.json"
_FACTOR = (0.5, 2.0)
OVERRUN_SHARE = 0.15  # how far this job's speed may rescale earlier jobs' times
# MusicGen's stages in the same segments: token steps are its steps, EnCodec its only decoder
STAGE_ALIASES = {"sampling": "diffusion", "decoding": "dcae_decode"}


def loop_length(params) -> int:
    """Sampler loop steps a job reports (one DiT evaluation each): heun's 2N-1, audio2audio's
    share of N (lofi.acestep.sampler.loop.sample)."""
    n = int(getattr(params, "infer_steps", 0) or 0)
    if getattr(params, "task", None) == "audio2audio":
        n = max(1, int((1.0 - float(getattr(params, "strength", 0.0))) * n))
    return 2 * n - 1 if getattr(params, "scheduler", "euler") == "heun" else n


def guided_steps(params, total: int) -> list[bool]:
    """Which of `total` loop steps evaluate the guided rows (ACE-Step's guidance window, computed
    from N and indexed by the loop step, as lofi.acestep.sampler.loop.Evaluator does). Backends
    without a guidance window (MusicGen: every step the same) get all False."""
    interval = getattr(params, "guidance_interval", None)
    if interval is None or total <= 0:
        return [False] * max(0, total)
    if getattr(params, "task", None) == "edit":
        return [True] * total
    if getattr(params, "guidance_scale", 0.0) in (0.0, 1.0):
        return [False] * total
    n = (total + 1) // 2 if getattr(params, "scheduler", "euler") == "heun" else total
    start, end = int(n * ((1 - interval) / 2)), int(n * (interval / 2 + 0.5))
    return [start <= i < end for i in range(total)]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e9


class Rates:
    """Observations of one key: segment -> [(audio seconds, seconds)], newest last."""

    def __init__(self, obs: dict | None = None):
        self.obs: dict[str, list[tuple[float, float]]] = {}
        for seg, pairs in (obs or {}).items():
            if seg in SEGMENTS and isinstance(pairs, list):
                good = [(float(p[0]), float(p[1])) for p in pairs
                        if isinstance(p, list) and len(p) == 2 and _num(p[0]) and _num(p[1])
                        and p[0] > 0 and p[1] >= 0]
                if good:
                    self.obs[seg] = good[-WINDOW:]

    def add(self, seg: str, duration: float, seconds: float) -> None:
        self.obs.setdefault(seg, []).append((float(duration), float(seconds)))
        del self.obs[seg][:-WINDOW]

    def predict(self, seg: str, duration: float) -> float | None:
        """A line through the observations when they span two lengths or more; otherwise the
        median, scaled with the length for the segments that grow with it."""
        pts = self.obs.get(seg)
        if not pts:
            return None
        ds = [d for d, _ in pts]
        if len(set(ds)) >= 2:
            md, ms = statistics.fmean(ds), statistics.fmean(s for _, s in pts)
            var = sum((d - md) ** 2 for d in ds)
            slope = sum((d - md) * (s - ms) for d, s in pts) / var
            if slope >= 0:
                return max(0.0, ms + slope * (duration - md))
        same = [s for d, s in pts if d == ds[-1]]
        base = statistics.median(same)
        return base * duration / ds[-1] if seg in SIZE_BOUND else base

    def as_json(self) -> dict:
        return {seg: [list(p) for p in pts] for seg, pts in self.obs.items()}


class Estimator:
    """Segment times per key, persisted (atomic writes; a damaged or foreign file is ignored)."""

    def __init__(self, home: Path | None = None):
        self.path = None if home is None else Path(home) / FILE_NAME
        self._rates: dict[str, Rates] = {}
        self._lock = threading.Lock()
        self.last_key: str | None = None
        for key, obs in self._read().items():
            self._rates[key] = Rates(obs)

    def _read(self) -> dict:
        if self.path is None:
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                data = json.loads(fh.read(1 << 20).decode("utf-8"),
                                  parse_constant=lambda c: None)
            rates = data["rates"] if data.get("version") == 1 else {}
            return {k: v for k, v in rates.items() if isinstance(k, str) and isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            log.warning("ignoring %s (%s); estimates start afresh", self.path, e)
            return {}

    def rates(self, key: str | None) -> Rates:
        with self._lock:
            return self._rates.get(key or "", Rates())

    def learn(self, key: str, duration: float, segments: dict[str, float]) -> None:
        with self._lock:
            on_disk = self._read()  # another daemon sharing LOFI_HOME may have learnt meanwhile
            for k, obs in on_disk.items():
                if k != key:
                    self._rates[k] = Rates(obs)
            r = self._rates.setdefault(key, Rates(on_disk.get(key)))
            for seg, sec in segments.items():
                if seg in SEGMENTS and sec is not None and sec >= 0:
                    r.add(seg, duration, sec)
            self.last_key = key
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        if os.path.islink(self.path):
            log.warning("not writing estimates: %s is a symbolic link", self.path)
            return
        data = json.dumps({"version": 1, "rates": {k: r.as_json() for k, r in self._rates.items()}},
                          indent=1, sort_keys=True).encode()
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot save estimates to %s: %s", self.path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def total(self, params, key: str | None = None) -> float | None:
        """The whole job's expected seconds, None before anything was measured."""
        r = self.rates(key or self.last_key)
        d = params.duration_sec
        parts = [r.predict(s, d) for s in ("text", "first_step", "dcae", "vocoder", "writing")]
        step, guided = r.predict("step", d), r.predict("guided", d)
        if step is None or any(p is None for p in parts):
            return None
        guided = step * GUIDED_COST if guided is None else guided
        return sum(parts) + _loop_time(params, step, guided)


def _loop_time(params, plain: float, guided: float) -> float:
    """A whole job's steps after the first (which is timed with the network's load)."""
    return sum(guided if g else plain for g in guided_steps(params, loop_length(params))[1:])


def _left(expected: float, spent: float) -> float:
    """Time left in a segment expected to take `expected` of which `spent` has passed. One that
    runs over is not assumed to end at once: a share of the time spent is still to come, so
    percent slows down instead of racing to 99."""
    return max(expected - spent, OVERRUN_SHARE * spent)


def model_key(backend: str, engine: str, device: str, precision: str, model: str) -> str:
    return "/".join(str(x) for x in (backend, engine, device, precision, model))


class JobClock:
    """One job's progress: fed the pipeline's (stage, step, total) calls, answers (percent,
    eta_sec) at any moment. percent never decreases and stays at most 99 (the caller reports
    100 once the file exists). `cost_model` (decoder seconds per unguided step) may be replaced
    by the pipeline's own once it is known."""

    def __init__(self, estimator: Estimator, params, clock=time.monotonic, start: float | None = None):
        self.est, self.params, self.clock = estimator, params, clock
        self.key: str | None = None
        self.cost_model = dict(COST_MODEL)
        self.t0 = clock() if start is None else start
        self.stage: str | None = None
        self.stage_t0 = self.t0
        self.step = 0
        self.total_steps = loop_length(params)
        self.diffusion_t0: float | None = None
        self.step_marks: list[tuple[float, int]] = []  # (time, steps done)
        self.seg: dict[str, float] = {}
        self.percent = 0
        self.fraction = 0.0
        self.single_decoder = False
        self._guided: list[bool] = []

    # -- input ----------------------------------------------------------------------------------
    def update(self, stage: str, step: int | None, total: int | None, fraction: float = 0.0,
               now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if stage in STAGE_ALIASES:
            self.single_decoder = True
            stage = STAGE_ALIASES[stage]
        self.fraction = max(self.fraction, fraction)
        if total:
            self.total_steps = total
        if stage != self.stage:
            self._close(now)
            self.stage, self.stage_t0 = stage, now
            if stage == "diffusion":
                self.diffusion_t0 = now
        if stage == "diffusion" and step:
            if not self.step_marks or step > self.step_marks[-1][1]:
                self.step_marks.append((now, step))
            self.step = step

    def _close(self, now: float) -> None:
        """The stage that just ended: its segment time."""
        names = {"text_encoding": "text", "dcae_decode": "dcae", "vocoder": "vocoder", "writing": "writing"}
        if self.stage in names:
            self.seg[names[self.stage]] = now - self.stage_t0

    def guided(self, step: int) -> bool:
        """Whether loop step `step` (1-based, as reported) runs the guided rows."""
        if len(self._guided) != self.total_steps:
            self._guided = guided_steps(self.params, self.total_steps)
        return 0 < step <= len(self._guided) and self._guided[step - 1]

    def segments(self, end: float) -> dict[str, float]:
        """Every segment measured by a finished job (to learn from)."""
        self._close(end)
        out = dict(self.seg)
        if self.step_marks and self.diffusion_t0 is not None:
            out["first_step"] = self.step_marks[0][0] - self.diffusion_t0
        live = self.live_steps()
        for seg, v in zip(("step", "guided"), live):
            if v is not None:
                out[seg] = v
        return out

    def total_for(self, params) -> float | None:
        """Another job's expected seconds from this job's own measurements (before any job has
        finished, for queue waits): its step times scaled to the other length, the cost model
        for the decoders."""
        plain, guided = self._unit_times(*self.live_steps(), None, None)
        if plain is None:
            return None
        scale = params.duration_sec / self.params.duration_sec
        plain, guided = plain * scale, guided * scale
        first = self.step_marks[0][0] - self.diffusion_t0 if self.diffusion_t0 is not None else plain
        return (self.seg.get("text", 0.0) + first + _loop_time(params, plain, guided)
                + sum(self.cost_model.values()) * plain + WRITE_PER_AUDIO_SEC * params.duration_sec)

    # -- output ---------------------------------------------------------------------------------
    def live_steps(self) -> tuple[float | None, float | None]:
        """Seconds per unguided and per guided step of this job, from the second step on (the
        first includes loading): medians of the single-step intervals of each kind."""
        kinds: dict[bool, list[float]] = {False: [], True: []}
        for (t1, s1), (t2, s2) in zip(self.step_marks, self.step_marks[1:]):
            if s2 - s1 == 1:
                kinds[self.guided(s2)].append(t2 - t1)
            else:  # steps reported together: their mean, counted where the kinds agree
                ks = {self.guided(s) for s in range(s1 + 1, s2 + 1)}
                if len(ks) == 1:
                    kinds[ks.pop()].append((t2 - t1) / (s2 - s1))
        # one interval of a kind is not enough where the other kind has more (the first step of a
        # new batch shape runs slow), but better than nothing
        least = 2 if any(len(v) >= 2 for v in kinds.values()) else 1
        return tuple(statistics.median(v) if len(v) >= least else None
                     for v in (kinds[False], kinds[True]))

    def _unit_times(self, live_plain, live_guided, hist_plain, hist_guided, factor=1.0):
        """(unguided, guided) seconds per step: this job's where measured, else earlier jobs'
        scaled by this job's speed, else the other kind times the guided/unguided ratio known
        from earlier jobs, this job or GUIDED_COST."""
        if hist_plain and hist_guided:
            ratio = hist_guided / hist_plain
        elif live_plain and live_guided:
            ratio = live_guided / live_plain
        else:
            ratio = GUIDED_COST
        plain = live_plain or (hist_plain * factor if hist_plain else None)
        guided = live_guided or (hist_guided * factor if hist_guided else None)
        if plain is None and guided is not None:
            plain = guided / ratio
        if guided is None and plain is not None:
            guided = plain * ratio
        return plain, guided

    def remaining(self, now: float) -> float | None:
        p = self.params
        d, n = p.duration_sec, self.total_steps
        r = self.est.rates(self.key)
        hist_plain, hist_guided = r.predict("step", d), r.predict("guided", d)
        live_plain, live_guided = self.live_steps()
        factor = 1.0
        if live_plain and hist_plain:
            factor = live_plain / hist_plain
        elif live_guided and hist_guided:
            factor = live_guided / hist_guided
        factor = min(max(factor, _FACTOR[0]), _FACTOR[1])
        plain, guided = self._unit_times(live_plain, live_guided, hist_plain, hist_guided, factor)
        if plain is None and self.step_marks and self.diffusion_t0 is not None:
            plain = guided = self.step_marks[0][0] - self.diffusion_t0  # one step so far: an upper bound

        def est(seg):
            v = r.predict(seg, d)
            if v is not None:
                return v * factor
            if seg in self.cost_model:
                return None if plain is None else self.cost_model[seg] * plain
            if seg == "writing":
                return WRITE_PER_AUDIO_SEC * d
            return None

        order = ["text", "first_step", "steps", "dcae", "vocoder", "writing"]
        if self.single_decoder:
            order.remove("vocoder")
        cur = {None: "text", "text_encoding": "text", "diffusion": "first_step", "dcae_decode": "dcae",
               "vocoder": "vocoder", "writing": "writing"}.get(self.stage, "writing")
        if cur == "first_step" and self.step_marks:
            cur = "steps"
        in_stage = now - self.stage_t0
        total = 0.0
        for seg in order[order.index(cur):]:
            if seg == "steps":
                if plain is None:
                    return None
                done = max(self.step, 1)
                times = [guided if self.guided(s) else plain for s in range(done + 1, n + 1)]
                if seg == cur and self.step_marks and times:
                    since = now - self.step_marks[-1][0]
                    total += _left(times[0], since) + sum(times[1:])
                else:
                    total += sum(times)
                continue
            e = est(seg)
            if e is None:
                return None
            total += _left(e, in_stage) if seg == cur else e
        return total

    def estimate(self, now: float | None = None) -> tuple[int, float | None]:
        """(percent, eta_sec) now."""
        now = self.clock() if now is None else now
        rem = self.remaining(now)
        if rem is None:  # nothing to go by yet: the pipeline's own share of the work
            pct = int(self.fraction * 100)
        else:
            elapsed = now - self.t0
            pct = int(100 * elapsed / (elapsed + rem)) if elapsed + rem > 0 else 0
        self.percent = max(self.percent, min(99, pct))
        return self.percent, None if rem is None else round(rem, 1)

"""The job queue and the worker thread that runs one generation at a time.

A job is created by `generate` (on the reader thread), waits in the queue (high priority ahead of
normal, first-in first-out within a priority), runs on the worker thread, and ends in exactly
one of complete, error or cancelled: `Daemon.finish` is the only way out and emits the
notification under the job's lock, the same lock that orders its progress notifications.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from dataclasses import replace

from lofi.errors import (MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, QUEUE_FULL, Cancelled, LofiError)
from lofi.params import GenerateParams
from lofi.progress import COST_MODEL, Estimator, JobClock, model_key
from lofi.daemon import backends
from lofi.daemon.cache import CACHE_WRITE_FAILED

log = logging.getLogger("lofi.jobs")

PRIORITIES = ("high", "normal")
PROGRESS_INTERVAL = 0.25  # at most 4 progress notifications a second
TICK_INTERVAL = 1.0  # during a long stage, the advancing percent once a second


class Job:
    def __init__(self, track_id: str, params: GenerateParams, priority: str, backend: str,
                 engine: str, precision: str, seq: int):
        self.track_id = track_id
        self.params = params
        self.priority = priority
        self.backend = backend
        self.engine = engine
        self.precision = precision
        self.seq = seq
        self.lock = threading.RLock()
        self.cancel_requested = threading.Event()
        self.announced = threading.Event()  # set once the generate response has been written
        self.outcome: str | None = None  # complete | error | cancelled, set once
        self.stage: str | None = None
        self.step = 0
        self.total_steps = params.infer_steps
        self.percent = 0
        self.eta_sec: float | None = None
        self.started: float | None = None  # monotonic
        self.tracker: ProgressTracker | None = None

    def order(self) -> tuple[int, int]:
        return PRIORITIES.index(self.priority), self.seq

    def summary(self) -> dict:
        p = self.params
        return {"track_id": self.track_id, "prompt": p.prompt, "duration_sec": p.duration_sec,
                "seed": p.seed, "infer_steps": p.infer_steps, "priority": self.priority,
                "backend": self.backend}

    def view(self) -> dict:
        with self.lock:
            elapsed = None if self.started is None else round(time.monotonic() - self.started, 2)
            return dict(self.summary(), stage=self.stage, step=self.step, total_steps=self.total_steps,
                        percent=self.percent, eta_sec=self.eta_sec, elapsed_sec=elapsed)


class JobQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.pending: list[Job] = []
        self.running: Job | None = None
        self.closed = False
        self._cv = threading.Condition()
        self._seq = itertools.count()

    def next_seq(self) -> int:
        return next(self._seq)

    def find(self, track_id: str) -> Job | None:
        with self._cv:
            if self.running is not None and self.running.track_id == track_id:
                return self.running
            return next((j for j in self.pending if j.track_id == track_id), None)

    def position(self, job: Job) -> int:
        """Jobs that must finish before this one starts (the running one included)."""
        with self._cv:
            if job is self.running:
                return 0
            return self.pending.index(job) + (self.running is not None)

    def submit(self, job: Job, estimator: "Estimator") -> tuple[Job, str, int]:
        """Queue a job -> (the job, "queued" | "generating", position). The same track already
        queued or running is not queued twice: its job is returned (raised to high if asked)."""
        with self._cv:
            if self.closed:
                raise LofiError(QUEUE_FULL, "the daemon is shutting down", {"queue_length": 0})
            same = self.find(job.track_id)
            if same is not None:
                if same is self.running:
                    return same, "generating", 0
                if job.priority == "high" and same.priority != "high":
                    self.pending.remove(same)
                    same.priority = "high"
                    bisect.insort(self.pending, same, key=Job.order)
                return same, "queued", self.position(same)
            if len(self.pending) >= self.capacity:
                wait = queue_wait(estimator, self.running, self.pending)
                slot = remaining(estimator, self.running)
                when = ("no job has been timed yet to estimate the wait" if wait is None else
                        f"a slot frees in about {slot:.0f} s, the queue drains in about {wait:.0f} s")
                raise LofiError(QUEUE_FULL, f"the queue is full ({len(self.pending)} of {self.capacity} "
                                f"jobs waiting); {when}; retry later or cancel a queued job",
                                {"queue_length": len(self.pending), "queue_size": self.capacity,
                                 "estimated_wait_sec": _round(wait), "retry_after_sec": _round(slot)})
            bisect.insort(self.pending, job, key=Job.order)
            self._cv.notify_all()
            return job, "queued", self.position(job)

    def take(self, timeout: float) -> Job | None:
        """The next job, now running; None on timeout or once closed."""
        with self._cv:
            if not self.pending and not self.closed:
                self._cv.wait(timeout)
            if self.closed or not self.pending:
                return None
            job = self.pending.pop(0)
            self.running = job
            return job

    def done(self, job: Job) -> None:
        with self._cv:
            if self.running is job:
                self.running = None

    def remove(self, job: Job) -> bool:
        with self._cv:
            if job in self.pending:
                self.pending.remove(job)
                return True
            return False

    def snapshot(self) -> tuple[Job | None, list[Job]]:
        with self._cv:
            return self.running, list(self.pending)

    def close(self) -> tuple[Job | None, list[Job]]:
        """Stop taking jobs; returns (the running job, the pending jobs, now removed)."""
        with self._cv:
            self.closed = True
            pending, self.pending = self.pending, []
            self._cv.notify_all()
            return self.running, pending


def _round(x):
    return None if x is None else round(x, 1)


def remaining(estimator: Estimator, job: Job | None) -> float | None:
    """Seconds until `job` ends (0 for no job); None before anything was measured."""
    if job is None:
        return 0.0
    if job.eta_sec is not None:
        return job.eta_sec
    total = estimator.total(job.params)
    if total is None:
        return None
    elapsed = 0.0 if job.started is None else time.monotonic() - job.started
    return max(0.0, total - elapsed)


def queue_wait(estimator: Estimator, running: Job | None, pending: list[Job]) -> float | None:
    wait = remaining(estimator, running)
    live = running.tracker.clock_of_job if running is not None and running.tracker else None
    for j in pending:
        t = estimator.total(j.params)
        if t is None and live is not None:
            t = live.total_for(j.params)
        if wait is None or t is None:
            return None
        wait += t
    return wait


class ProgressTracker:
    """Turns the pipeline's (stage, step, total, fraction) calls into generation_progress
    notifications with percent and eta_sec from the clock (lofi.progress.JobClock): percent
    monotonic and at most 99, at most one notification every PROGRESS_INTERVAL s (a held-back
    update is sent by `flush`, which the daemon's main loop calls; during a long stage `flush`
    also sends the advancing percent once a TICK_INTERVAL)."""

    def __init__(self, job: Job, estimator: Estimator, send, clock=time.monotonic):
        self.job, self.send, self.clock = job, send, clock
        self.clock_of_job = JobClock(estimator, job.params, clock, start=job.started)
        self.last_sent: float | None = None
        self.dirty = False

    def __call__(self, stage: str, step: int | None, total: int | None, fraction: float) -> None:
        now = self.clock()
        job = self.job
        with job.lock:
            if job.outcome is not None:
                return
            job.stage = stage
            if total:
                job.total_steps = total
            if step is not None:
                job.step = step
            self.clock_of_job.update(stage, step, total, fraction, now)
            job.percent, job.eta_sec = self.clock_of_job.estimate(now)
            self.dirty = True
            self._maybe_send(now)

    def _maybe_send(self, now) -> None:
        if self.last_sent is not None and now - self.last_sent < PROGRESS_INTERVAL:
            return
        job = self.job
        self.send("generation_progress", {
            "track_id": job.track_id, "stage": job.stage, "percent": job.percent, "step": job.step,
            "current_step": job.step,  # lofi.nvim's name for step
            "total_steps": job.total_steps, "eta_sec": job.eta_sec})
        self.last_sent, self.dirty = now, False

    def flush(self) -> None:
        job = self.job
        with job.lock:
            if job.outcome is not None or job.stage is None:
                return
            now = self.clock()
            before = job.percent
            job.percent, job.eta_sec = self.clock_of_job.estimate(now)
            if job.percent != before and (self.last_sent is None or now - self.last_sent >= TICK_INTERVAL):
                self.dirty = True
            if self.dirty:
                self._maybe_send(now)


class Worker(threading.Thread):
    """Owns the engine: creates it on first use, runs every job, releases models on request."""

    def __init__(self, daemon):
        super().__init__(name="lofi-worker", daemon=True)
        self.d = daemon
        self.pipeline = None
        self.pipeline_backend: str | None = None
        self.live: dict = {}  # engine facts for status/get_backends, refreshed on this thread
        self.release_requested = threading.Event()
        self.model = "unknown"  # the checkpoint's identity, for the estimates' key

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        q = self.d.queue
        while True:
            job = q.take(timeout=0.5)
            if job is None:
                if q.closed:
                    return
                self._release_if_asked()
                continue
            try:
                self.run_job(job)
            except BaseException:  # never lose the worker; the job still ends once
                log.exception("worker failure on %s", job.track_id)
                self.d.finish(job, "error", {"track_id": job.track_id, "code": MODEL_INFERENCE_FAILED,
                                             "message": "internal error in the worker; see the log"})
            finally:
                q.done(job)
                self._release_if_asked()

    def _release_if_asked(self) -> None:
        """Between jobs: drop the engine when asked (set_backend, or setup replaced the files)."""
        if self.release_requested.is_set():
            self.release_requested.clear()
            self._drop_pipeline()

    def _drop_pipeline(self) -> None:
        if self.pipeline is not None:
            try:
                self.pipeline.release()
            except Exception:
                log.exception("releasing the models failed")
        self.pipeline = self.pipeline_backend = None
        self.live = {}

    def _pipeline_for(self, backend: str):
        if self.pipeline is not None and self.pipeline_backend != backend:
            self._drop_pipeline()
        if self.pipeline is None:
            self.d.backends.require_ready(backend)
            try:
                self.pipeline = backends.open_pipeline(self.d.settings, backend)
            except LofiError:
                raise
            except MemoryError as e:
                raise LofiError(MODEL_LOAD_FAILED, "out of memory creating the engine") from e
            except Exception as e:
                raise LofiError(MODEL_LOAD_FAILED, f"cannot start the engine: {type(e).__name__}: {e}") from e
            self.pipeline_backend = backend
            self.model = backends.model_id(backends.checkpoint_dir(self.d.settings, backend), backend)
        return self.pipeline

    def _refresh_live(self) -> None:
        p = self.pipeline
        if p is None:
            self.live = {}
            return
        eng = p.engine
        live = {"engine": getattr(eng, "name", None), "device": getattr(eng, "device", None),
                "precision": getattr(eng, "precision", None)}
        try:
            live["loaded"] = list(p.loaded())
            live["memory"] = dict(eng.memory())
        except Exception:  # facts for display only
            live.setdefault("loaded", [])
        self.live = live

    # -- one job ----------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        d = self.d
        while not job.announced.wait(0.05):  # the generate response goes out first
            if job.cancel_requested.is_set():
                break
        with job.lock:
            job.started = time.monotonic()
            job.tracker = tracker = ProgressTracker(job, d.estimator, d.notify)
        if job.cancel_requested.is_set():
            self._end(job, "cancelled", cancelled_payload(job))
            return
        d.notify("generation_start", dict(job.summary(), engine=job.engine, precision=job.precision))
        staged = None

        def progress(stage, step, total, fraction):
            tracker(stage, step, total, fraction)
            self._refresh_live()

        failure = None  # (kind, payload) of a job that did not complete
        try:
            staged = d.cache.staging_path(job.track_id, d.settings.format)
            pipeline = self._pipeline_for(job.backend)
            self._refresh_live()
            eng = pipeline.engine
            tracker.clock_of_job.key = model_key(job.backend, getattr(eng, "name", job.engine),
                                                 getattr(eng, "device", None), getattr(eng, "precision",
                                                 job.precision), self.model)
            if hasattr(pipeline, "progress_costs"):
                tracker.clock_of_job.cost_model = pipeline.progress_costs(COST_MODEL)
            info = pipeline.generate(replace(job.params), staged, fmt=d.settings.format,
                                     progress=progress, cancel=job.cancel_requested.is_set)
            end = time.monotonic()
            with job.lock:  # a cancel that arrived meanwhile wins: nothing is kept
                if job.cancel_requested.is_set():
                    raise Cancelled()
                track = d.cache.commit(job.track_id, staged, sidecar(job, info, end - job.started,
                                                                        d.settings.format))
                self._end(job, "complete", complete_payload(track, cached=False))
            if tracker.clock_of_job.key is not None:
                d.estimator.learn(tracker.clock_of_job.key, job.params.duration_sec,
                                  tracker.clock_of_job.segments(end))
        except Cancelled:
            failure = "cancelled", cancelled_payload(job)
        except LofiError as e:
            log.warning("job %s failed: [%s] %s", job.track_id, e.code, e.message)
            failure = "error", {"track_id": job.track_id, "code": e.code, "message": e.message}
        except OSError as e:  # writing the file: a read-only or full disk
            log.warning("job %s failed to write: %s", job.track_id, e)
            failure = "error", {"track_id": job.track_id, "code": CACHE_WRITE_FAILED,
                                "message": f"cannot write the track: {e.strerror or e}; check that "
                                f"{d.cache.root} is writable and has free space"}
        except MemoryError:
            failure = "error", {"track_id": job.track_id, "code": MODEL_INFERENCE_FAILED,
                                "message": "out of memory while generating; try a shorter duration, "
                                "precision fp16 or closing other applications"}
        except Exception as e:
            log.exception("job %s failed", job.track_id)
            failure = "error", {"track_id": job.track_id, "code": MODEL_INFERENCE_FAILED,
                                "message": f"generation failed: {type(e).__name__}: {e}"}
        finally:
            try:
                if staged is not None:
                    staged.unlink()
            except OSError:  # never written, or the folder went read-only: the next start cleans
                pass
        if failure is not None:  # free the memory first, so a status after the notice is true
            if failure[0] == "error":
                self._drop_pipeline()  # a later job re-reads a repaired checkpoint
            elif not d.settings.keep_loaded and self.pipeline is not None:
                self.pipeline.release()
            self._refresh_live()
            self._end(job, *failure)

    def _end(self, job: Job, kind: str, payload: dict) -> None:
        self.d.queue.done(job)
        self.d.finish(job, kind, payload)


# -- notification payloads ---------------------------------------------------------------------

def cancelled_payload(job: Job) -> dict:
    return {"track_id": job.track_id, "at_step": job.step, "total_steps": job.total_steps}


def sidecar(job: Job, info: dict, wall_sec: float, fmt: str) -> dict:
    """Everything known about a finished track, stored next to it."""
    from lofi import __version__
    return {
        "params": job.params.to_dict(), "prompt": job.params.prompt, "seed": job.params.seed,
        "duration_sec": info.get("duration_sec", job.params.duration_sec),
        "sample_rate": info.get("sample_rate"), "channels": info.get("channels"),
        "format": fmt,
        "backend": job.backend, "engine": info.get("engine", job.engine),
        "device": info.get("device"), "precision": info.get("precision", job.precision),
        "model_version": info.get("model_version"),
        "generation_time_sec": round(wall_sec, 3), "timings": info.get("timings", {}),
        "priority": job.priority, "lofi_version": __version__,
    }


def complete_payload(track, cached: bool) -> dict:
    m = track.meta
    out = dict(m.get("params", {}))  # every generation parameter, at the top level
    out.update({
        "track_id": track.track_id, "path": str(track.audio), "duration_sec": m.get("duration_sec"),
        "sample_rate": m.get("sample_rate"), "channels": m.get("channels"), "prompt": m.get("prompt"),
        "seed": m.get("seed"), "generation_time_sec": m.get("generation_time_sec"),
        "model_version": m.get("model_version"), "backend": m.get("backend"),
        "engine": m.get("engine"), "device": m.get("device"), "precision": m.get("precision"),
        "format": m.get("format"), "created_at": m.get("created_at"), "cached": cached,
    })
    return out

"""The daemon process: three threads around one queue.

- the reader thread reads stdin line by line and answers every request at once (methods.py);
- the worker thread runs one generation at a time (jobs.py);
- the main thread waits for a reason to stop (stdin closed, SIGTERM/SIGINT/SIGHUP, `shutdown`,
  the parent gone), sends held-back progress, and on stop cancels everything and exits within a
  second, leaving no partial file.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from lofi.daemon.backends import Backends
from lofi.daemon.cache import TrackCache
from lofi.daemon.jobs import Job, JobQueue, Worker, cancelled_payload
from lofi.progress import Estimator
from lofi.daemon.methods import handle_line, internal_error
from lofi.daemon.transport import Writer, read_lines

log = logging.getLogger("lofi.daemon")

STOP_BUDGET_SEC = 0.5  # of the 1 s allowed, the part spent waiting for the worker to stop
TICK_SEC = 0.1


class Daemon:
    def __init__(self, settings, in_fd: int, out_fd: int):
        self.settings = settings
        self.in_fd = in_fd
        self.started = time.monotonic()
        self.writer = Writer(out_fd)
        self.backends = Backends(settings)
        self.cache = TrackCache(settings.tracks_dir, settings.cache_size)
        self.queue = JobQueue(settings.queue_size)
        self.estimator = Estimator(settings.home)
        self.worker = Worker(self)
        self.stop_reason: str | None = None
        self.on_stop: list = []  # callables run at shutdown
        self.player = None  # made on first use by the playback methods (lofi/playback.py)
        self.radio = None  # the running radio (lofi/daemon/radio.py)
        self.listeners: list = []  # fn(method, params) called with every notification; must not block
        self._stop = threading.Event()

    # -- used by methods and jobs -------------------------------------------------------------
    def notify(self, method: str, params: dict) -> None:
        self.writer.send({"jsonrpc": "2.0", "method": method, "params": params})
        for fn in list(self.listeners):
            fn(method, params)

    def finish(self, job: Job, kind: str, payload: dict) -> bool:
        """End a job as complete | error | cancelled, exactly once."""
        with job.lock:
            if job.outcome is not None:
                return False
            job.outcome = kind
            self.notify("generation_" + kind, payload)
        log.info("job %s %s", job.track_id, kind)
        return True

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    # -- the process --------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until told to stop; returns the exit status. Call from the main thread."""
        if not self.cache.opened:
            self.cache.open()
        self.worker.start()
        threading.Thread(target=self._read_loop, name="lofi-reader", daemon=True).start()
        parent = os.getppid()
        log.info("lofi daemon %d ready (home %s, backend %s, engine %s, precision %s)", os.getpid(),
                 self.settings.home, self.backends.current, self.settings.engine, self.settings.precision)
        while not self._stop.wait(TICK_SEC):
            running = self.queue.running
            if running is not None and running.tracker is not None:
                running.tracker.flush()
            if os.getppid() != parent:
                self.request_stop("parent process exited")
        return self._shutdown()

    def _read_loop(self) -> None:
        try:
            for line in read_lines(self.in_fd):
                if self._stop.is_set():
                    return
                self._answer(line)
                if self.writer.closed:
                    self.request_stop("stdout closed")
                    return
        finally:  # whatever happened, a reader that is gone means nobody can talk to us
            self.request_stop("stdin closed")

    def _answer(self, line) -> None:
        """One request line; no failure here may end the reader (a deaf daemon is worse than
        one internal error)."""
        try:
            response, deferred = handle_line(self, line)
        except BaseException as e:  # noqa: RecursionError, MemoryError, a bug
            log.exception("request handling failed")
            response, deferred = internal_error(e), []
        if response is not None:
            self.writer.send(response)
        for fn in deferred:
            try:
                fn()
            except Exception:
                log.exception("after-response action failed")

    def _shutdown(self) -> int:
        t0 = time.monotonic()
        log.info("stopping: %s", self.stop_reason)
        running, pending = self.queue.close()
        for job in pending:
            self.finish(job, "cancelled", cancelled_payload(job))
        if running is not None:
            running.cancel_requested.set()
        self.worker.join(timeout=max(0.0, STOP_BUDGET_SEC - (time.monotonic() - t0)))
        if running is not None and running.lock.acquire(timeout=0.1):
            try:  # still inside a network call: stop waiting, the process ends now
                self.finish(running, "cancelled", cancelled_payload(running))
            finally:
                running.lock.release()
        self.cache.remove_staging()
        if self.player is not None:
            self.on_stop.append(self.player.close)  # stop our own playback, nothing else
        for fn in self.on_stop:
            try:
                fn()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("stopped in %.2f s", time.monotonic() - t0)
        return 0

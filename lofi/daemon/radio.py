"""The radio: endless music from the daemon, one generated track after another.

Methods (registered by `register(method)`, like lofi/daemon/setup.py):
  radio_start {prompt?, prompts?, strategy?, duration_sec?, crossfade_sec?, wait_mode?, volume?,
               seed?, ...generation params}   radio_stop {}   radio_skip {}   radio_status {}
  radio_keep {track_id, keep?}
Notifications: radio_track {track_id, path, index, prompt, seed, duration_sec, start_frame,
crossfade_sec} when a track starts to sound, radio_state {state: playing|waiting|stopped, reason?}.

The mix runs in a player process (lofi/mixer_process.py); this module is its controller, one
thread reacting to the player's events and to the end of the radio's own generation jobs. One
track is prefetched: it is requested when the current one reaches half its length, or earlier
when the measured generation time says it would otherwise arrive after the crossfade point. Its
job is queued at priority normal but behind every other normal job, so a user's own `generate`
is served first. Radio tracks are ordinary cache entries; `radio_keep` pins one against eviction.

Strategy `continue` makes one endless piece: every track after the first is an ACE-Step `extend`
of the last `context_sec` (default 20 s) of the track before (written under `$LOFI_HOME/radio/`, removed once its
job ends), and the player starts it where the new music begins. The join is not a crossfade
between pieces: it blends the last JOIN_SEC of the playing track with the same audio as the
continuation decoded it again (the vocoder does not reproduce phase, so a sample-exact butt join
of two decodes would click). The radio's tracks are ACE-Step's, whatever the current backend.
"""


from __future__ import annotations

import io
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from lofi.daemon.radio_plan import (BACKEND, EARLY_MARGIN, JOIN_SEC, MAX_FAILURES, RADIO_SEQ,
                                    SPEC, SR, Entry, Strategy, _bad, parse)
from lofi.errors import QUEUE_FULL, UNKNOWN_TRACK, LofiError
from lofi.mixer_process import MixerProcess
from lofi.params import GenerateParams
from lofi.playback import PLAYBACK_FAILED, player_mode

log = logging.getLogger("lofi.radio")

class Radio:
    def __init__(self, d, cfg: dict, volume: float):
        self.d = d
        self.cfg = cfg
        self.strategy: Strategy = cfg["strategy"]
        self.state = "waiting"
        self.reason: str | None = "starting"
        self.index = 0  # of the next track to request
        self.pending: Entry | None = None  # requested, not finished
        self.ready: Entry | None = None  # in the player's queue
        self.current: Entry | None = None
        self.request_at: float | None = time.monotonic()
        self.failures = 0
        self.paused_at: float | None = None
        self.last_gen_sec: float | None = None
        self.history: list[Entry] = getattr(d, "radio_history", [])
        d.radio_history = self.history
        self._inbox: list[tuple] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._lock = threading.RLock()  # state shared with the method handlers
        mode = player_mode()
        if mode not in ("auto", "miniaudio", "null"):
            raise LofiError(PLAYBACK_FAILED, f"the radio mixes its crossfades itself and needs "
                            f"miniaudio; LOFI_PLAYER={mode} plays through an external program")
        self.mixer = MixerProcess(
            "null" if mode == "null" else "auto",
            cfg["crossfade_sec"], cfg["wait_mode"], volume,
            on_event=lambda msg: self._post("player", msg),
            curve="linear" if self.strategy.name == "continue" else "power")
        self.player_name = f"miniaudio ({self.mixer.backend})"
        self.thread = threading.Thread(target=self._run, name="lofi-radio", daemon=True)

    # -- inputs from other threads ------------------------------------------------------------
    def _post(self, kind: str, payload) -> None:
        with self._cv:
            self._inbox.append((kind, payload))
            self._cv.notify()

    def on_notify(self, method: str, params: dict) -> None:
        """Listener on every daemon notification: picks out the end of the radio's job."""
        if method in ("generation_complete", "generation_error", "generation_cancelled"):
            p = self.pending
            if p is not None and params.get("track_id") == p.track_id:
                self._post("job", (method, params))

    # -- the controller thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._stopped:
                    due = self.request_at
                    if (due is not None and self.pending is None and self.ready is None
                            and self.paused_at is None):
                        left = due - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    else:
                        self._cv.wait()
                if self._stopped:
                    return
                inbox, self._inbox = self._inbox, []
            with self._lock:
                for kind, payload in inbox:
                    if kind == "wake":
                        continue
                    try:
                        (self._on_player if kind == "player" else self._on_job)(payload)
                    except Exception:
                        log.exception("radio: handling %s %s failed", kind, payload)
                if self._stopped:
                    return
                if (self.request_at is not None and self.pending is None and self.ready is None
                        and self.paused_at is None and time.monotonic() >= self.request_at):
                    self.request_at = None
                    try:
                        self._request()
                    except LofiError as e:  # no engine, a strategy's bad fields: try again, then stop
                        self._failed(e.message)
                    except Exception as e:
                        log.exception("radio: requesting a track failed")
                        self._failed(f"{type(e).__name__}: {e}")

    def _request(self) -> None:
        """Ask for the next track: straight from the cache if it exists, else a queued job."""
        from lofi.daemon.jobs import Job

        from lofi.acestep.tasks import resolve as resolve_task
        from lofi.daemon.backends import build_params

        d, i = self.d, self.index
        previous = self.current or (self.history[-1] if self.history else None)
        fields = self.strategy.request(i, previous)
        seed = (self.cfg["seed"] + i) % 2**32 if self.cfg["seed"] is not None else secrets.randbits(32)
        e = Entry(i, fields["prompt"], seed, requested_at=time.monotonic())
        given = dict(self.cfg["base"], duration_sec=self.cfg["duration_sec"], seed=seed, **fields)
        if self.strategy.name == "continue" and previous is not None and previous.path:
            e.tail, e.offset = self._write_tail(previous, i)
            given.update(task="extend", src_audio=e.tail, right_sec=self.cfg["duration_sec"],
                         retake_seed=(seed + 1) % 2**32, duration_sec=None)
        try:
            # the generate method's spelling of the same track (numbers as floats, source hashed)
            gp = build_params(BACKEND, given,
                              lambda p: resolve_task(p, d.cache.root, d.settings.home / "lora"))
        except BaseException:
            self._drop_tail(e)
            raise
        engine, precision = d.backends.identity(BACKEND)
        e.track_id = gp.track_id(engine, precision)
        e.token = f"{i}:{e.track_id}"
        self.index += 1
        cached = d.cache.lookup(e.track_id, touch=True)
        if cached is not None:
            self._drop_tail(e)
            self.pending = e
            self._on_job(("generation_complete", {"track_id": e.track_id, "path": str(cached.audio),
                                                  "generation_time_sec": 0.0}))
            return
        try:
            d.backends.require_ready(BACKEND)
            job = Job(e.track_id, gp, "normal", BACKEND, engine, precision,
                      RADIO_SEQ + d.queue.next_seq())
            e.job, _, _ = d.queue.submit(job, d.estimator)
        except LofiError as err:
            self._drop_tail(e)
            self.index -= 1
            retry = err.code == QUEUE_FULL
            self._failed(err.message, retry_in=2.0 if retry else None)
            return
        self.pending = e
        e.job.announced.set()  # no response to wait for: the worker may start it now
        log.info("radio: requested track %d (%s, seed %d)", i, e.track_id, seed)

    def _write_tail(self, previous: Entry, index: int) -> tuple[str, int]:
        """The last `context_sec` of `previous` as a file of ours, and where the continuation's
        played part starts in its output (the context's length, less the join)."""
        import soundfile as sf

        from lofi.daemon.files import real_dir, write_new
        try:
            wave, sr = sf.read(previous.path, dtype="float32", always_2d=True)
        except Exception as err:
            raise LofiError(PLAYBACK_FAILED, f"cannot read the track to continue: {err}") from err
        if sr != SR:
            raise LofiError(PLAYBACK_FAILED, f"the track to continue is {sr} Hz, not {SR}")
        n = min(len(wave), round(self.cfg["context_sec"] * SR))
        folder = self.d.settings.home / "radio"
        if not real_dir(folder):
            os.mkdir(folder, 0o755)  # fails on a link or a file of that name: nothing followed
        buf = io.BytesIO()
        sf.write(buf, wave[len(wave) - n:], SR, format="WAV", subtype="FLOAT")
        path = folder / f"context-{index}-{secrets.token_hex(4)}.wav"
        write_new(path, buf.getvalue())
        return str(path), max(0, n - round(JOIN_SEC * SR))

    def _drop_tail(self, e: Entry) -> None:
        from lofi.daemon.files import unlink
        if e.tail is not None:
            unlink(Path(e.tail))
            e.tail = None

    def _on_job(self, ev) -> None:
        method, params = ev
        e = self.pending
        if e is None or params.get("track_id") != e.track_id:
            return
        self.pending = None
        self._drop_tail(e)
        if method != "generation_complete":
            self._failed(params.get("message") or "the radio's track was cancelled")
            return
        self.failures = 0
        e.path = params["path"]
        e.gen_sec = time.monotonic() - e.requested_at
        if params.get("generation_time_sec"):
            self.last_gen_sec = e.gen_sec
        self.ready = e
        self.mixer.send("queue", token=e.token, path=e.path, offset=e.offset)

    def _failed(self, message: str, retry_in: float | None = None) -> None:
        if retry_in is None:
            self.failures += 1
            log.warning("radio: track failed (%d in a row): %s", self.failures, message)
            if self.failures >= MAX_FAILURES:
                self.stop(f"{self.failures} tracks in a row failed: {message}")
                return
        self.request_at = time.monotonic() + (retry_in or 0.0)
        if self.current is None or self.state == "waiting":
            self._set_state("waiting", message)

    def _on_player(self, msg: dict) -> None:
        ev = msg.get("ev")
        if ev == "exited":
            if not self._stopped:
                self.stop("the player process exited")
        elif ev == "load_error":
            if self.ready is not None and self.ready.token == msg.get("token"):
                self.ready = None
                self._failed(f"cannot play the track: {msg.get('message')}")
        elif ev == "started":
            e = self.ready
            if e is None or e.token != msg.get("token"):
                return
            self.ready, self.current = None, e
            e.started_at, e.start_frame = time.monotonic(), msg.get("frame")
            self.history.append(e)
            del self.history[:-100]
            self.request_at = e.started_at + self._prefetch_delay()
            self.d.notify("radio_track", dict(e.public(), duration_sec=self.cfg["duration_sec"],
                                              start_frame=e.start_frame,
                                              crossfade_sec=self.cfg["crossfade_sec"]))
            self._set_state("playing")
        elif ev == "underrun":
            log.warning("radio: underrun at %.2f s of output, %.0f ms late",
                        msg.get("frame", 0) / 48000, msg.get("late_ms", 0))
        elif ev == "waiting":
            self._set_state("waiting", "the next track is not ready yet")
            if self.pending is None and self.ready is None and self.request_at is None:
                self.request_at = time.monotonic()

    def _prefetch_delay(self) -> float:
        """Seconds after a track starts to request the next: half the track, or earlier when the
        next would otherwise be ready after this one's crossfade point."""
        dur, xf = self.cfg["duration_sec"], self.cfg["crossfade_sec"]
        est = [self.last_gen_sec]
        try:
            gen = dur + (self.cfg["context_sec"] if self.strategy.name == "continue" else 0.0)
            gp = GenerateParams(prompt="x", duration_sec=gen, **self.cfg["base"])
            est.append(self.d.estimator.total(gp))
            running, pending = self.d.queue.snapshot()
            est.append((self.d.estimator.queue_wait(running, pending) or 0.0) + (est[-1] or 0.0))
        except Exception:
            pass
        lead = max((x for x in est if x is not None), default=0.0) * EARLY_MARGIN
        return max(0.0, min(dur / 2, dur - xf - lead))

    def _set_state(self, state: str, reason: str | None = None) -> None:
        if state == self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        payload = {"state": state, "index": self.current.index if self.current else None,
                   "track_id": self.current.track_id if self.current else None}
        if reason:
            payload["reason"] = reason
        self.d.notify("radio_state", payload)

    # -- called by the method handlers -----------------------------------------------------------
    def start(self) -> None:
        self.d.listeners.append(self.on_notify)
        self._set_state("waiting", "generating the first track")  # before any generation_start
        self.thread.start()

    def skip(self) -> dict:
        with self._lock:
            self.mixer.send("skip")
            if self.ready is None:
                self._set_state("waiting", "skipping: the next track is not ready yet")
                if self.pending is None:
                    self.request_at = time.monotonic()
                    self._post("wake", None)
            return {"skipped": True, "next_ready": self.ready is not None,
                    "next": self.ready.public() if self.ready else None}

    def pause(self) -> dict:
        with self._lock:
            if self.paused_at is not None:
                return {"paused": False, "state": "paused"}
            self.mixer.send("pause")
            self.paused_at = time.monotonic()
            return {"paused": True, "state": "paused", "radio": True}

    def resume(self) -> dict:
        with self._lock:
            if self.paused_at is None:
                return {"resumed": False, "state": "playing"}
            self.mixer.send("resume")
            held, self.paused_at = time.monotonic() - self.paused_at, None
            if self.current is not None:  # the clock of the track stood still
                self.current.started_at += held
            if self.request_at is not None and self.pending is None and self.ready is None:
                self.request_at += held
            self._post("wake", None)
            return {"resumed": True, "state": "playing", "radio": True}

    def stop(self, reason: str = "stopped") -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            job = self.pending.job if self.pending is not None else None
            if self.pending is not None:
                self._drop_tail(self.pending)
            self.pending = None
        try:
            self.d.listeners.remove(self.on_notify)
        except ValueError:
            pass
        if job is not None:
            _cancel(self.d, job)
        self.mixer.close()
        with self._cv:
            self._cv.notify()
        if getattr(self.d, "radio", None) is self:
            self.d.radio = None
        self.state, self.reason = "stopped", reason
        self.d.notify("radio_state", {"state": "stopped", "reason": reason})

    def status(self) -> dict:
        with self._lock:
            now = time.monotonic()
            cur = self.current
            nxt = self.ready or self.pending
            out = {"state": self.state, "reason": self.reason, "strategy": self.strategy.name,
                   "prompts": self.strategy.prompts, "duration_sec": self.cfg["duration_sec"],
                   "crossfade_sec": self.cfg["crossfade_sec"], "wait_mode": self.cfg["wait_mode"],
                   "player": self.player_name, "player_pid": self.mixer.proc.pid,
                   "underruns": self.mixer.stats.get("underruns"),
                   "min_margin_ms": self.mixer.stats.get("min_margin_ms"),
                   "current": None, "next": None, "next_request_in_sec": None}
            if cur is not None:
                at = self.paused_at or now
                out["current"] = dict(cur.public(), position_sec=round(at - cur.started_at, 3))
            out["paused"] = self.paused_at is not None
            if nxt is not None:
                out["next"] = dict(nxt.public(), status="ready" if nxt is self.ready else "generating")
            if self.request_at is not None and nxt is None:
                out["next_request_in_sec"] = round(max(0.0, self.request_at - now), 3)
            return out


def _cancel(d, job) -> None:
    from lofi.daemon.jobs import cancelled_payload

    with job.lock:
        if job.outcome is not None:
            return
        if d.queue.remove(job):
            d.finish(job, "cancelled", cancelled_payload(job))
        else:
            job.cancel_requested.set()


def _history(d) -> list[dict]:
    out = []
    for e in reversed(getattr(d, "radio_history", [])):
        t = d.cache.lookup(e.track_id)
        e.kept = bool(t is not None and t.meta.get("pinned"))
        out.append(dict(e.public(), cached=t is not None))
    return out


def register(method) -> None:
    @method("radio_start", SPEC)
    def radio_start(d, params, call):
        cfg = parse(params)
        d.backends.require_ready(BACKEND)
        old = getattr(d, "radio", None)
        if old is not None:
            old.stop("replaced")
        player = getattr(d, "player", None)
        volume = params.get("volume", player.volume if player is not None else 80.0)
        if isinstance(volume, bool) or not 0 <= volume <= 100:
            raise _bad("volume", f"volume must be a number from 0 to 100, got {volume!r}")
        if player is not None:
            player.stop()  # one thing sounds at a time
        d.radio = Radio(d, cfg, float(volume))
        call.after_send(d.radio.start)
        if not getattr(d, "radio_stops_with_daemon", False):
            d.radio_stops_with_daemon = True
            d.on_stop.append(lambda: d.radio and d.radio.stop("daemon stopping"))
        return {"started": True, "strategy": cfg["strategy"].name, "prompts": cfg["strategy"].prompts,
                "duration_sec": cfg["duration_sec"],
                "crossfade_sec": cfg["crossfade_sec"], "context_sec": cfg["context_sec"],
                "wait_mode": cfg["wait_mode"], "player": d.radio.player_name}

    @method("radio_stop")
    def radio_stop(d, params, call):
        r = getattr(d, "radio", None)
        if r is None:
            return {"stopped": False}
        call.after_send(r.stop)
        return {"stopped": True}

    @method("radio_skip")
    def radio_skip(d, params, call):
        r = getattr(d, "radio", None)
        if r is None:
            raise LofiError(PLAYBACK_FAILED, "the radio is not playing; start it with radio_start")
        return r.skip()

    @method("radio_status")
    def radio_status(d, params, call):
        r = getattr(d, "radio", None)
        out = r.status() if r is not None else {"state": "stopped"}
        out["history"] = _history(d)
        return out

    @method("radio_keep", {"track_id": ((str,), True), "keep": ((bool,), False)})
    def radio_keep(d, params, call):
        tid, keep = params["track_id"], params.get("keep", True)
        if d.cache.pin(tid, keep) is None:
            raise LofiError(UNKNOWN_TRACK, f"no cached track {tid}", {"track_id": tid})
        return {"track_id": tid, "kept": keep}

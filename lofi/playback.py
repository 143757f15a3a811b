"""Playback inside the daemon, the same on macOS, Linux and Windows.

miniaudio (a self-contained audio library with its own decoders and backends) plays first; an
external player (afplay, pw-play, paplay, ffplay, mpv) is only a fallback. Whatever plays, the
Player only ever stops, pauses or signals the playback it started itself.

Methods for the daemon's dispatch table (params -> result, see `install`):
  play {path, volume?}  pause {}  resume {}  stop {}  volume {volume?}  playback_status {}
and notifications `playback_started` {path, player, volume, duration_sec} and
`playback_ended` {path, player, reason: finished|stopped|replaced|error, position_sec}.
Volume is 0-100 (perceived loudness: the gain is (volume/100)^2).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lofi.errors import INVALID_PARAMS, LofiError

PLAYBACK_FAILED = "PLAYBACK_FAILED"
MODES = ("auto", "miniaudio", "null", "external")

# name -> argv builder(path, volume 0-100). Order is preference.
EXTERNAL_PLAYERS: dict[str, Callable[[str, float], list[str]]] = {
    "afplay": lambda p, v: ["afplay", "-v", f"{v / 100:.3f}", p],
    "pw-play": lambda p, v: ["pw-play", f"--volume={v / 100:.3f}", p],
    "paplay": lambda p, v: ["paplay", f"--volume={int(round(v / 100 * 65536))}", p],
    "ffplay": lambda p, v: ["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet",
                            "-volume", str(int(round(v))), p],
    "mpv": lambda p, v: ["mpv", "--no-video", "--really-quiet", f"--volume={int(round(v))}", p],
}

_SLICE = 4096  # frames per decoder read (miniaudio's stream storage is 16384)

Notify = Callable[[str, dict], None]


def _gain(volume: float) -> float:
    return (volume / 100.0) ** 2


def _check_volume(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
        raise LofiError(INVALID_PARAMS, f"volume must be a number from 0 to 100, got {v!r}",
                        {"field": "volume"})
    return float(v)


def _die_with_parent():
    """Linux: the external player gets SIGTERM if the daemon dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _MiniaudioOutput:
    """One file on one miniaudio device; the data callback applies gain and counts frames."""

    def __init__(self, path: str, volume: float, backends: list, on_done: Callable[[], None]):
        import miniaudio

        self._ma = miniaudio
        info = miniaudio.get_file_info(path)
        self.sample_rate = info.sample_rate
        self.nchannels = min(max(info.nchannels, 1), 2)
        self.duration = float(info.duration)
        self.frames = 0
        self._ran = 0.0  # seconds the device has run, up to the last pause
        self._since: float | None = None
        self.gain = _gain(volume)
        self._on_done = on_done
        self._stream = miniaudio.stream_file(
            path, output_format=miniaudio.SampleFormat.FLOAT32, nchannels=self.nchannels,
            sample_rate=self.sample_rate, frames_to_read=_SLICE)
        self.device = miniaudio.PlaybackDevice(
            output_format=miniaudio.SampleFormat.FLOAT32, nchannels=self.nchannels,
            sample_rate=self.sample_rate, backends=backends, app_name="lofi")
        self.backend = self.device.backend
        self._feed = self._generator()
        next(self._feed)
        self.device.start(self._feed)
        self._since = time.monotonic()

    def _read(self, frames: int) -> np.ndarray:
        parts, left = [], frames
        while left > 0:
            n = min(left, _SLICE)
            try:
                chunk = self._stream.send(n)
            except StopIteration:
                break
            a = np.frombuffer(chunk, dtype=np.float32)
            if a.size == 0:
                break
            parts.append(a)
            left -= a.size // self.nchannels
            if a.size // self.nchannels < n:
                break
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _generator(self):
        frames = yield b""
        while True:
            a = self._read(frames)
            if a.size == 0:
                break
            self.frames += a.size // self.nchannels
            frames = yield (a * np.float32(self.gain)).astype(np.float32).tobytes()
        # runs on the audio thread: hand the teardown to another thread
        threading.Thread(target=self._on_done, daemon=True).start()

    @property
    def position(self) -> float:
        # frames handed over run ahead of the speaker by the device buffer; wall time does not
        ran = self._ran + (time.monotonic() - self._since if self._since is not None else 0.0)
        return min(self.frames / self.sample_rate, ran)

    def pause(self):
        self.device.stop()
        if self._since is not None:
            self._ran += time.monotonic() - self._since
            self._since = None

    def resume(self):
        self.device.start(self._feed)
        self._since = time.monotonic()

    def close(self):
        try:
            self.device.close()
        finally:
            self._stream.close()


class _ExternalOutput:
    """A player process we started; only that process is ever signalled."""

    def __init__(self, name: str, path: str, volume: float, on_exit: Callable[[int], None]):
        self.name = name
        self.started = time.monotonic()
        self.paused_at: float | None = None
        self.paused_total = 0.0
        kwargs = {}
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = _die_with_parent
        self.proc = subprocess.Popen(EXTERNAL_PLAYERS[name](path, volume), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        threading.Thread(target=lambda: on_exit(self.proc.wait()), daemon=True).start()

    @property
    def position(self) -> float:
        now = self.paused_at if self.paused_at is not None else time.monotonic()
        return now - self.started - self.paused_total

    def pause(self):
        if not hasattr(signal, "SIGSTOP"):
            raise LofiError(PLAYBACK_FAILED, f"{self.name} cannot be paused on this platform")
        self.proc.send_signal(signal.SIGSTOP)
        self.paused_at = time.monotonic()

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)
        if self.paused_at is not None:
            self.paused_total += time.monotonic() - self.paused_at
            self.paused_at = None

    def close(self):
        if self.proc.poll() is not None:
            return
        if self.paused_at is not None and hasattr(signal, "SIGCONT"):
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Player:
    """Plays one file at a time. Thread-safe; `notify(method, params)` may be called from any thread."""

    def __init__(self, notify: Notify, mode: str = "auto", volume: float = 80.0):
        if mode not in MODES and mode not in EXTERNAL_PLAYERS:
            raise ValueError(f"player mode must be one of {', '.join(MODES + tuple(EXTERNAL_PLAYERS))}")
        self.notify = notify
        self.mode = mode
        self.volume = _check_volume(volume)
        self._lock = threading.RLock()
        self._out = None
        self._path: str | None = None
        self._player: str | None = None
        self._state = "stopped"
        self._token = 0  # identifies the current playback; stale end events are ignored

    # -- what can play ----------------------------------------------------------------------

    def _miniaudio_backends(self):
        """Backends to ask miniaudio for, or None when this mode does not use miniaudio."""
        if self.mode in ("external",) or self.mode in EXTERNAL_PLAYERS:
            return None
        try:
            import miniaudio
        except ImportError:
            return None
        if self.mode == "null":
            return [miniaudio.Backend.NULL]
        # never the null device outside tests: silence that looks like playback is worse than an error
        return [b for b in miniaudio.get_enabled_backends()
                if b not in (miniaudio.Backend.NULL, miniaudio.Backend.CUSTOM)]

    def _external_candidates(self) -> list[str]:
        if self.mode in EXTERNAL_PLAYERS:
            return [self.mode] if shutil.which(self.mode) else []
        if self.mode in ("auto", "external"):
            return [n for n in EXTERNAL_PLAYERS if shutil.which(n)]
        return []

    def _probe_miniaudio(self) -> str | None:
        """Name of the miniaudio backend that opens a device now, or None."""
        backends = self._miniaudio_backends()
        if not backends:
            return None
        import miniaudio

        try:
            dev = miniaudio.PlaybackDevice(backends=backends, app_name="lofi")
        except Exception:
            return None
        try:
            return dev.backend
        finally:
            dev.close()

    def available(self) -> list[str]:
        """Players that would work now, in the order play() tries them."""
        out = []
        backend = self._probe_miniaudio()
        if backend:
            out.append(f"miniaudio ({backend})")
        return out + self._external_candidates()

    # -- transport ----------------------------------------------------------------------------

    def _ended(self, token: int, reason: str):
        """The file ran out (or the external player exited): tidy up and announce it once."""
        with self._lock:
            if token != self._token or self._out is None:
                return
            out = self._out
        if isinstance(out, _MiniaudioOutput):
            # the decoder ran dry; the device still has its buffer to play
            time.sleep(max(0.0, min(1.0, out.frames / out.sample_rate - out.position)))
        with self._lock:
            if token != self._token:
                return  # stopped or replaced meanwhile; that path announced it
            path, player = self._path, self._player
            finished = reason == "finished" and isinstance(out, _MiniaudioOutput)
            position = out.frames / out.sample_rate if finished else out.position
            self._out, self._path, self._player, self._state = None, None, None, "stopped"
            self._token += 1
            try:
                out.close()
            except Exception:
                pass
        self.notify("playback_ended", {"path": path, "player": player, "reason": reason,
                                       "position_sec": round(position, 3)})

    def _stop_current(self, reason: str):
        with self._lock:
            out, path, player = self._out, self._path, self._player
            if out is None:
                return False
            position = out.position
            self._token += 1
            self._out, self._path, self._player, self._state = None, None, None, "stopped"
            out.close()
        self.notify("playback_ended", {"path": path, "player": player, "reason": reason,
                                       "position_sec": round(position, 3)})
        return True

    def play(self, path: str, volume: float | None = None,
             defer: Callable[[Callable[[], None]], None] | None = None) -> dict:
        """Play `path`, replacing what plays. `defer(fn)`, when given, runs the playback_started
        notification after the caller has sent its response."""
        try:  # absolute, so a name like "--script=x" never reaches a player's argv as an option
            p = Path(path).expanduser().absolute()
            found = p.is_file()
        except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, no home for ~user
            found = False
        if not found:
            raise LofiError(INVALID_PARAMS, f"path: no such audio file: {path[:200]}", {"field": "path"})
        if volume is not None:
            self.volume = _check_volume(volume)
        with self._lock:
            self._stop_current("replaced")
            self._token += 1
            token = self._token
            errors = []
            out, player = None, None
            backends = self._miniaudio_backends()
            if backends:
                try:
                    out = _MiniaudioOutput(str(p), self.volume, backends,
                                           lambda: self._ended(token, "finished"))
                    player = f"miniaudio ({out.backend})"
                except Exception as e:  # no device, or a format miniaudio cannot decode
                    errors.append(f"miniaudio: {e}")
            if out is None:
                for name in self._external_candidates():
                    try:
                        out = _ExternalOutput(name, str(p), self.volume,
                                              lambda rc: self._ended(token, "finished" if rc == 0 else "error"))
                        player = name
                        break
                    except OSError as e:
                        errors.append(f"{name}: {e}")
            if out is None:
                tried = "; ".join(errors) or "no miniaudio and none of " + ", ".join(EXTERNAL_PLAYERS)
                raise LofiError(PLAYBACK_FAILED, f"cannot play {p.name}: {tried}")
            duration = out.duration if isinstance(out, _MiniaudioOutput) else _duration(p)
            self._out, self._path, self._player, self._state = out, str(p), player, "playing"
        info = {"path": str(p), "player": player, "volume": self.volume, "duration_sec": duration}
        started = lambda: self.notify("playback_started", info)  # noqa: E731
        defer(started) if defer else started()
        return {"playing": True, **info}

    def pause(self) -> dict:
        with self._lock:
            if self._state != "playing":
                return {"paused": False, "state": self._state}
            self._out.pause()
            self._state = "paused"
            return {"paused": True, "state": "paused", "position_sec": round(self._out.position, 3)}

    def resume(self) -> dict:
        with self._lock:
            if self._state != "paused":
                return {"resumed": False, "state": self._state}
            self._out.resume()
            self._state = "playing"
            return {"resumed": True, "state": "playing"}

    def stop(self) -> dict:
        return {"stopped": self._stop_current("stopped")}

    def set_volume(self, volume: float | None = None) -> dict:
        with self._lock:
            if volume is None:
                return {"volume": self.volume}
            self.volume = _check_volume(volume)
            live = isinstance(self._out, _MiniaudioOutput)
            if live:
                self._out.gain = _gain(self.volume)
            # an external player took its volume at start; the next track gets the new one
            return {"volume": self.volume, "applied_now": live or self._out is None}

    def status(self) -> dict:
        avail = self.available()
        with self._lock:
            return {
                "state": self._state,
                "path": self._path,
                "player": self._player or (avail[0] if avail else None),
                "available": avail,
                "volume": self.volume,
                "position_sec": round(self._out.position, 3) if self._out else None,
            }

    def close(self):
        """Stop our playback (daemon shutdown)."""
        self._stop_current("stopped")


def _duration(p: Path) -> float | None:
    try:
        import soundfile

        return float(soundfile.info(str(p)).duration)
    except Exception:
        return None


def player_mode() -> str:
    """$LOFI_PLAYER, checked: auto | miniaudio | null | external | an external player's name."""
    mode = (os.environ.get("LOFI_PLAYER") or "auto").strip().lower()
    if mode not in MODES and mode not in EXTERNAL_PLAYERS:
        raise LofiError(PLAYBACK_FAILED, f"LOFI_PLAYER={mode!r}: must be one of "
                        f"{', '.join(MODES + tuple(EXTERNAL_PLAYERS))}")
    return mode


def install(method) -> None:
    """Register play, pause, resume, stop, volume and playback_status with the daemon's
    `method(name, spec)` decorator (lofi.daemon.methods). The Player is made on first use
    as `daemon.player`, notifying through `daemon.notify`; the daemon closes it when it stops."""

    def player(d) -> Player:
        p = getattr(d, "player", None)
        if p is None:
            p = d.player = Player(d.notify, mode=player_mode())
        return p

    # The radio (lofi/daemon/radio.py) plays through its own player process: while it runs,
    # pause/resume/volume act on it, and play or stop end it (one thing sounds at a time).
    @method("play", {"path": ((str,), True), "volume": ((int, float), False)})
    def play(d, params, call):
        if getattr(d, "radio", None) is not None:
            d.radio.stop("replaced by play")
        return player(d).play(params["path"], params.get("volume"), defer=call.after_send)

    @method("pause")
    def pause(d, params, call):
        radio = getattr(d, "radio", None)
        return radio.pause() if radio is not None else player(d).pause()

    @method("resume")
    def resume(d, params, call):
        radio = getattr(d, "radio", None)
        return radio.resume() if radio is not None else player(d).resume()

    @method("stop")
    def stop(d, params, call):
        if getattr(d, "radio", None) is not None:
            d.radio.stop("stopped")
        return player(d).stop()

    @method("volume", {"volume": ((int, float), False)})
    def volume(d, params, call):
        p = player(d)
        if getattr(d, "radio", None) is not None and params.get("volume") is not None:
            p.volume = _check_volume(params["volume"])
            d.radio.mixer.send("volume", volume=p.volume)
            return {"volume": p.volume, "applied_now": True}
        return p.set_volume(params.get("volume"))

    @method("playback_status")
    def playback_status(d, params, call):
        return player(d).status()

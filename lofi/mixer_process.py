"""The radio's player: a separate process that owns the audio device and the mix (lofi/mix.py).

Why a process: the daemon's worker thread runs the model in Python (numpy, MLX, ONNX Runtime
calls that hold the GIL between kernels). An audio callback in the daemon would wait for that
GIL and starve the device. This process has a GIL of its own, shared only with a stdin reader
(which decodes files outside the mixer lock) and two writer threads, so the callback never
waits on generation. The daemon talks to it over pipes, one JSON object per line:

  daemon -> player  {"cmd": "queue", "token", "path", "offset"?} | "skip" | "clear" | "pause" | "resume"
                    | {"cmd": "volume", "volume"} | {"cmd": "config", "crossfade_sec"?,
                    "wait_mode"?} | "quit" (or end of input)
  player -> daemon  {"ev": "ready", "backend"} | {"ev": "error", "message"}
                    | {"ev": "queued", "token", "frames"} | {"ev": "load_error", "token", "message"}
                    | {"ev": "started"|"looped"|"waiting"|"ended", "token", "frame"}
                    | {"ev": "underrun", "frame", "late_ms"}
                    | {"ev": "stats", "underruns", "frames", "min_margin_ms", "callbacks"}

An underrun is counted when a callback starts after every frame handed to the device so far
should have been played (the device's clock taken as the wall clock since the first callback);
the clock is re-anchored after each one. `min_margin_ms` is the closest a callback came to that.
Test hook: with LOFI_PLAYER_CAPTURE=FILE every mixed block (after gain) is appended to FILE as
raw float32 interleaved stereo, in order, from the first track's first frame.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

from lofi.errors import LofiError
from lofi.mix import CURVES, WAIT_MODES, Mixer

SAMPLE_RATE = 48000
CHANNELS = 2
BUFFER_MSEC = 200  # headroom for a busy machine; a skip is heard within ~2 buffers
STATS_SEC = 0.5
PLAYBACK_FAILED = "PLAYBACK_FAILED"


# -- the player process ---------------------------------------------------------------------------

class _Player:
    def __init__(self, backend: str, crossfade_sec: float, wait_mode: str, volume: float, out,
                 curve: str = "power"):
        import miniaudio

        self.ma = miniaudio
        self.mixer = Mixer(CHANNELS, round(crossfade_sec * SAMPLE_RATE), wait_mode, curve)
        self.lock = threading.Lock()  # held only for short mixer calls, never while decoding
        self.gain = (volume / 100.0) ** 2
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.out = out
        self.underruns = 0
        self.callbacks = 0
        self.min_margin: float | None = None
        self.anchor: float | None = None
        self.delivered = 0
        self.started = self.paused = False
        capture = os.environ.get("LOFI_PLAYER_CAPTURE")
        self.capture: queue.SimpleQueue | None = queue.SimpleQueue() if capture else None
        self.capture_thread = None
        if capture:
            self.capture_thread = threading.Thread(target=self._capture_writer, args=(capture,),
                                                   daemon=True)
            self.capture_thread.start()
        if backend == "null":
            backends = [miniaudio.Backend.NULL]
        else:  # never the null device outside tests: silence that looks like playback is worse
            backends = [b for b in miniaudio.get_enabled_backends()
                        if b not in (miniaudio.Backend.NULL, miniaudio.Backend.CUSTOM)]
        self.device = miniaudio.PlaybackDevice(
            output_format=miniaudio.SampleFormat.FLOAT32, nchannels=CHANNELS, sample_rate=SAMPLE_RATE,
            buffersize_msec=BUFFER_MSEC, backends=backends, app_name="lofi radio")
        self.gen = self._callback()
        next(self.gen)

    # runs on the audio thread: no locks but the mixer's, no I/O, no allocation beyond the block
    def _callback(self):
        frames = yield b""
        while True:
            now = time.monotonic()
            if self.anchor is None:
                self.anchor = now
            else:
                margin = self.anchor + self.delivered / SAMPLE_RATE - now
                if self.min_margin is None or margin < self.min_margin:
                    self.min_margin = margin
                if margin < 0:
                    self.underruns += 1
                    self.anchor = now - self.delivered / SAMPLE_RATE
                    self.events.put({"ev": "underrun", "frame": self.delivered,
                                     "late_ms": round(-margin * 1000, 1)})
            self.callbacks += 1
            with self.lock:
                block, events = self.mixer.render(frames)
                gain = self.gain
            self.delivered += frames
            if gain != 1.0:
                block *= np.float32(gain)
            if self.capture is not None:
                self.capture.put(block.tobytes())
            for e in events:
                self.events.put({"ev": e[0], "token": e[1], "frame": e[2]})
            frames = yield block.tobytes()

    def _capture_writer(self, path: str) -> None:
        with open(path, "ab") as fh:
            while True:
                data = self.capture.get()
                if data is None:
                    return
                fh.write(data)
                fh.flush()

    def send(self, msg: dict) -> None:
        self.events.put(msg)

    def writer(self) -> None:
        """Sends queued events, and the counters every STATS_SEC."""
        last = 0.0
        while True:
            try:
                msg = self.events.get(timeout=STATS_SEC)
            except queue.Empty:
                msg = {}
            if msg is None:
                return
            now = time.monotonic()
            lines = [msg] if msg else []
            if now - last >= STATS_SEC:
                last = now
                lines.append(self.stats())
            for m in lines:
                self.out.write(json.dumps(m).encode() + b"\n")
            self.out.flush()

    def stats(self) -> dict:
        margin = None if self.min_margin is None else round(self.min_margin * 1000, 1)
        return {"ev": "stats", "underruns": self.underruns, "frames": self.delivered,
                "callbacks": self.callbacks, "min_margin_ms": margin}

    # -- commands, on the main thread ----------------------------------------------------------
    def handle(self, cmd: dict) -> bool:
        kind = cmd.get("cmd")
        if kind == "queue":
            try:
                data = self._decode(cmd["path"])
                offset = int(cmd.get("offset") or 0)  # a continuation's context is not played
                if not 0 <= offset < len(data):
                    raise ValueError(f"offset {offset} outside the track's {len(data)} frames")
                data = data[offset:]
            except Exception as e:
                self.send({"ev": "load_error", "token": cmd["token"], "message": str(e)})
                return True
            with self.lock:
                self.mixer.enqueue(cmd["token"], data)
            self.send({"ev": "queued", "token": cmd["token"], "frames": len(data)})
            if not self.started and not self.paused:
                self.started = True
                self.device.start(self.gen)
        elif kind == "skip":
            with self.lock:
                self.mixer.skip()
        elif kind == "clear":
            with self.lock:
                self.mixer.clear()
        elif kind == "volume":
            self.gain = (float(cmd["volume"]) / 100.0) ** 2
        elif kind == "config":
            with self.lock:
                if "crossfade_sec" in cmd:
                    self.mixer.crossfade = round(float(cmd["crossfade_sec"]) * SAMPLE_RATE)
                if cmd.get("wait_mode") in WAIT_MODES:
                    self.mixer.wait_mode = cmd["wait_mode"]
        elif kind == "pause" and self.started and not self.paused:
            self.paused = True
            self.device.stop()
        elif kind == "resume" and self.paused:
            self.paused = False
            self.anchor, self.delivered = None, 0  # the device clock starts over
            self.device.start(self.gen)
        elif kind == "quit":
            return False
        return True

    def _decode(self, path: str) -> np.ndarray:
        ma = self.ma
        f = ma.decode_file(path, output_format=ma.SampleFormat.FLOAT32, nchannels=CHANNELS,
                           sample_rate=SAMPLE_RATE)
        return np.frombuffer(f.samples, dtype=np.float32).reshape(-1, CHANNELS)

    def close(self) -> None:
        try:
            self.device.close()
        finally:
            if self.capture is not None:
                self.capture.put(None)
                self.capture_thread.join(5)
            self.events.put(self.stats())
            self.events.put(None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lofi.mixer_process")
    ap.add_argument("--backend", choices=("auto", "null"), default="auto")
    ap.add_argument("--crossfade-sec", type=float, default=4.0)
    ap.add_argument("--wait-mode", choices=WAIT_MODES, default="loop")
    ap.add_argument("--volume", type=float, default=80.0)
    ap.add_argument("--curve", choices=CURVES, default="power")
    args = ap.parse_args(argv)
    out = os.fdopen(os.dup(1), "wb")  # the protocol's own stdout; fd 1 goes to stderr
    os.dup2(2, 1)
    try:
        player = _Player(args.backend, args.crossfade_sec, args.wait_mode, args.volume, out,
                         args.curve)
    except Exception as e:
        out.write(json.dumps({"ev": "error", "message": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        out.flush()
        return 1
    writer = threading.Thread(target=player.writer, daemon=True)
    writer.start()
    player.send({"ev": "ready", "backend": player.device.backend})
    try:
        for line in sys.stdin.buffer:
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if not player.handle(cmd):
                break
    finally:
        player.close()
        writer.join(2)
    return 0


# -- the daemon's side ---------------------------------------------------------------------------

class MixerProcess:
    """Starts the player process and talks to it; `on_event(msg)` runs on a reader thread."""

    def __init__(self, backend: str, crossfade_sec: float, wait_mode: str, volume: float,
                 on_event: Callable[[dict], None], start_timeout: float = 20.0,
                 curve: str = "power"):
        from lofi.playback import _die_with_parent

        kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lofi.mixer_process", "--backend", backend,
             "--crossfade-sec", repr(float(crossfade_sec)), "--wait-mode", wait_mode,
             "--volume", repr(float(volume)), "--curve", curve],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kwargs)
        self.on_event = on_event
        self.stats: dict = {"underruns": 0, "frames": 0, "callbacks": 0, "min_margin_ms": None}
        self.backend: str | None = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._wlock = threading.Lock()
        threading.Thread(target=self._read, name="lofi-mixer-reader", daemon=True).start()
        if not self._ready.wait(start_timeout) or self._error:
            self.close()
            raise LofiError(PLAYBACK_FAILED, f"the radio's player did not start: "
                            f"{self._error or 'no answer in %.0f s' % start_timeout}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("ev")
            if ev == "ready":
                self.backend = msg.get("backend")
                self._ready.set()
            elif ev == "error":
                self._error = msg.get("message")
                self._ready.set()
            elif ev == "stats":
                self.stats = {k: msg.get(k) for k in ("underruns", "frames", "callbacks", "min_margin_ms")}
            else:
                self.on_event(msg)
        self._ready.set()
        self.on_event({"ev": "exited"})

    def send(self, cmd: str, **fields) -> bool:
        data = json.dumps(dict(fields, cmd=cmd)).encode() + b"\n"
        with self._wlock:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
                return True
            except (OSError, ValueError):
                return False

    def close(self) -> None:
        self.send("quit")
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())

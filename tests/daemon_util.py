"""Spawn the real lofi daemon and talk to it, for tests.

`Daemon` runs `python -m lofi.daemon` (or, with `fake_step_sec`, the same daemon whose
pipeline factory is replaced by `FakePipeline`, for tests that need a controllable clock) under
a temporary LOFI_HOME, reads its stdout on a thread, and offers request/notification helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = Path(__file__).resolve().parent / "fixtures" / "ace_step_tiny" / "checkpoint"


def make_home(tmp: Path, checkpoint: bool = True) -> Path:
    home = Path(tmp) / "lofi-home"
    home.mkdir(parents=True, exist_ok=True)
    if checkpoint and not (home / "ace-step").exists():
        (home / "ace-step").symlink_to(CHECKPOINT, target_is_directory=True)
    return home


class Daemon:
    def __init__(self, home: Path, *args: str, env: dict | None = None,
                 fake_step_sec: float | None = None, check_start: bool = True,
                 wrap: list[str] | None = None):
        self.home = Path(home)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOFI_")}
        full_env.update({"LOFI_HOME": str(home), "PYTHONUNBUFFERED": "1",
                         "LOFI_ENGINE": os.environ.get("LOFI_ENGINE", "mlx")})
        full_env.update(env or {})
        if fake_step_sec is not None:
            full_env["FAKE_STEP_SEC"] = str(fake_step_sec)
            cmd = [sys.executable, "-c", "from tests.daemon_util import fake_main; fake_main()"]
        else:
            cmd = [sys.executable, "-m", "lofi.daemon"]
        self.stderr_path = self.home / f"stderr-{time.monotonic_ns()}.txt"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen((wrap or []) + cmd + list(args), cwd=ROOT, env=full_env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self.lines: list[dict] = []  # everything received, in order
        self.times: list[float] = []  # time.monotonic() when each line arrived
        self.raw: list[bytes] = []
        self._cv = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if check_start:
            self.call("ping", timeout=30)

    def _read(self):
        for raw in self.proc.stdout:
            with self._cv:
                self.raw.append(raw)
                self.times.append(time.monotonic())
                self.lines.append(json.loads(raw))  # a non-JSON line fails the test
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    # -- sending ------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, method: str, params=None, rid=None) -> int:
        if rid is None:
            self._next_id += 1
            rid = self._next_id
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg).encode() + b"\n")
        return rid

    def request(self, method: str, params=None, timeout: float = 10.0) -> dict:
        rid = self.send(method, params)
        return self.response(rid, timeout)

    def call(self, method: str, params=None, timeout: float = 10.0):
        resp = self.request(method, params, timeout)
        assert "result" in resp, f"{method} failed: {resp}"
        return resp["result"]

    # -- receiving ----------------------------------------------------------------------------
    def wait_for(self, pred, timeout: float = 30.0, what: str = "message", start: int = 0) -> dict:
        """The first message (from index `start`) satisfying pred."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for m in self.lines[start:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.lines[-10:]}\n"
                                         f"stderr: {self.stderr()[-3000:]}")
                self._cv.wait(left)

    def response(self, rid, timeout: float = 10.0) -> dict:
        return self.wait_for(lambda m: isinstance(m, dict) and m.get("id") == rid and "method" not in m, timeout, f"response {rid}")

    def event(self, method: str, track_id: str | None = None, timeout: float = 60.0) -> dict:
        m = self.wait_for(lambda m: isinstance(m, dict) and m.get("method") == method and
                          (track_id is None or m["params"].get("track_id") == track_id),
                          timeout, f"{method} for {track_id}")
        return m["params"]

    def end(self, track_id: str, timeout: float = 60.0) -> tuple[str, dict]:
        """The notification that ended a job: (complete|error|cancelled, params)."""
        m = self.wait_for(lambda m: isinstance(m, dict) and m.get("method") in ENDINGS and m["params"].get("track_id") == track_id,
                          timeout, f"end of {track_id}")
        return m["method"].removeprefix("generation_"), m["params"]

    def events(self, method: str | None = None, track_id: str | None = None,
               with_times: bool = False) -> list:
        with self._cv:
            out = [(t, m["params"]) for t, m in zip(self.times, self.lines)
                   if isinstance(m, dict) and "method" in m and
                   (method is None or m["method"] == method) and
                   (track_id is None or m["params"].get("track_id") == track_id)]
        return out if with_times else [p for _, p in out]

    def ended(self, track_id: str) -> list[str]:
        """Every ending notification of a track (a correct daemon sends exactly one)."""
        with self._cv:
            return [m["method"] for m in self.lines if isinstance(m, dict) and m.get("method") in ENDINGS
                    and m["params"].get("track_id") == track_id]

    def index_of(self, pred) -> int:
        with self._cv:
            return next(i for i, m in enumerate(self.lines) if pred(m))

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    # -- ending -------------------------------------------------------------------------------
    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.close_stdin()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


ENDINGS = ("generation_complete", "generation_error", "generation_cancelled")


def staging_files(home: Path) -> list[Path]:
    staging = Path(home) / "tracks" / ".staging"
    return [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []


def track_files(home: Path) -> list[Path]:
    return sorted(p for p in (Path(home) / "tracks").iterdir() if p.is_file() and p.name != ".lock")


# -- a pipeline with a controllable clock --------------------------------------------------------

class FakeEngine:
    name, device, precision = "mlx", "cpu", "fp32"

    def memory(self):
        return {"active": 0, "peak": 0}


class FakePipeline:
    """Follows Pipeline.generate's contract (stages, progress fractions, cancel polling,
    atomic write at the end) with `FAKE_STEP_SEC` seconds per diffusion step (the DCAE and the
    vocoder take `FAKE_DECODE_STEPS` = "dcae,vocoder" steps, default "1,1"), writing a real
    48 kHz stereo sine (an extend keeps its source in place, the sine around it). A prompt
    containing FAIL_INFERENCE raises MODEL_INFERENCE_FAILED at step
    2; one containing FAIL_CRASH raises a plain RuntimeError (a bug, as the daemon sees it)."""

    def __init__(self, step_sec: float, decode_steps: tuple[float, float] = (1.0, 1.0)):
        self.step_sec = step_sec
        self.decode_steps = decode_steps  # DCAE and vocoder time, in diffusion steps
        self.engine = FakeEngine()
        self._loaded: list[str] = []

    def loaded(self):
        return list(self._loaded)

    def release(self):
        self._loaded.clear()

    def generate(self, params, out_path, fmt="wav", progress=None, cancel=None):
        import soundfile as sf

        from lofi.errors import MODEL_INFERENCE_FAILED, Cancelled, LofiError

        def check():
            if cancel is not None and cancel():
                raise Cancelled()

        t0 = time.perf_counter()
        check()
        progress("text_encoding", None, None, 0.0)
        self._loaded = ["text_encoder"]
        time.sleep(self.step_sec)
        self._loaded = ["transformer"]
        progress("diffusion", 0, None, 0.03)
        for i in range(params.infer_steps):
            check()
            time.sleep(self.step_sec)
            if "FAIL_INFERENCE" in params.prompt and i == 1:
                raise LofiError(MODEL_INFERENCE_FAILED, "DiT produced NaN or Inf values")
            if "FAIL_CRASH" in params.prompt and i == 1:
                raise RuntimeError("simulated bug")
            progress("diffusion", i + 1, params.infer_steps, 0.03 + 0.85 * (i + 1) / params.infer_steps)
        cost = dict(zip(("dcae_decode", "vocoder"), self.decode_steps))
        for stage, frac in (("dcae_decode", 0.88), ("vocoder", 0.93), ("writing", 0.98)):
            check()
            progress(stage, None, None, frac)
            left = self.step_sec * cost.get(stage, 1.0)
            while left > 0:  # cancellable within a long stage, as the real networks are not
                time.sleep(min(left, 0.05))
                left -= 0.05
        n = round(params.duration_sec * 48000)
        t = np.arange(n) / 48000.0
        tone = 0.2 * np.sin(2 * np.pi * (220 + params.seed % 200) * t)
        wave = np.stack([tone, tone], 1).astype(np.float32)
        if getattr(params, "task", None) == "extend":  # the source kept as it is, the tone around it
            src, _ = sf.read(params.src_audio, dtype="float32", always_2d=True)
            at = round(params.left_sec * 48000)
            m = min(len(src), n - at)
            wave[at:at + m] = src[:m]
        out_path = Path(out_path)
        tmp = out_path.with_name("." + out_path.name + ".tmp")
        sf.write(tmp, wave, 48000, format=fmt.upper(), subtype="PCM_16")
        os.replace(tmp, out_path)
        return {"path": str(out_path), "duration_sec": n / 48000, "sample_rate": 48000, "channels": 2,
                "seed": params.seed, "generation_time_sec": time.perf_counter() - t0,
                "timings": {}, "model_version": "ace-step-v1-3.5b", "engine": "mlx",
                "device": "cpu", "precision": "fp32", "params": params.to_dict()}


def fake_main():
    """The real daemon with its pipeline factory replaced by FakePipeline."""
    from lofi.daemon import backends
    from lofi.daemon.__main__ import main

    step = float(os.environ["FAKE_STEP_SEC"])
    decode = tuple(float(x) for x in os.environ.get("FAKE_DECODE_STEPS", "1,1").split(","))
    backends.open_pipeline = lambda settings, backend="ace-step": FakePipeline(step, decode)
    sys.exit(main(sys.argv[1:]))

"""Does the radio's audio starve while the model generates? Two designs, the same mixer and device.

  process    the product: the real daemon (`python -m lofi.daemon`) runs the radio; the mix and
             the device callback live in the player process (lofi/mixer_process.py). The model
             generates the radio's own tracks plus a back-to-back queue of other jobs; `ping` is
             timed throughout.
  inprocess  the alternative it replaced: the same player object (_Player) in the process that
             generates, its device callback sharing the GIL with the pipeline's thread.

Both play on miniaudio's null device (real time, silent) and count underruns the same way: a
callback that starts after all audio handed to the device so far should have been played.

  PYTHONPATH=. python benchmarks/radio_underruns.py --checkpoint DIR [--seconds 60] [--duration 10]
      [--steps 8] [--mode both|process|inprocess] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _tone(path: Path, seconds: float) -> None:
    import soundfile as sf
    t = np.arange(int(seconds * 48000)) / 48000
    x = 0.2 * np.sin(2 * np.pi * 220 * t)
    sf.write(path, np.stack([x, x], 1).astype(np.float32), 48000, subtype="PCM_16")


class Rpc:
    def __init__(self, home: Path, env: dict):
        full = {k: v for k, v in os.environ.items() if not k.startswith("LOFI_")}
        full.update(env, LOFI_HOME=str(home), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "lofi.daemon"], cwd=ROOT, env=full,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(home / "stderr.txt", "wb"))
        self.cv = threading.Condition()
        self.answers: dict = {}
        self.notes: list = []
        self.n = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            m = json.loads(line)
            with self.cv:
                if "id" in m and "method" not in m:
                    self.answers[m["id"]] = m
                else:
                    self.notes.append((time.monotonic(), m))
                self.cv.notify_all()

    def call(self, method, params=None, timeout=60):
        self.n += 1
        rid = self.n
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                          "params": params or {}}).encode() + b"\n")
        self.proc.stdin.flush()
        with self.cv:
            if not self.cv.wait_for(lambda: rid in self.answers, timeout):
                raise TimeoutError(method)
            m = self.answers.pop(rid)
        if "error" in m:
            raise RuntimeError(m["error"])
        return m["result"]

    def wait_note(self, pred, timeout):
        with self.cv:
            ok = self.cv.wait_for(lambda: any(pred(m) for _, m in self.notes), timeout)
        if not ok:
            raise TimeoutError("notification")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def run_process(ckpt: Path, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="radio-bench-"))
    (tmp / "ace-step").symlink_to(ckpt.resolve(), target_is_directory=True)
    d = Rpc(tmp, {"LOFI_PLAYER": "null", "LOFI_ENGINE": args.engine})
    try:
        gen = {"duration_sec": args.duration, "infer_steps": args.steps}
        d.call("radio_start", dict(gen, prompt="lofi radio", crossfade_sec=1))
        d.wait_note(lambda m: m.get("method") == "radio_track", 3600)  # the first track (and load)
        users = [d.call("generate", dict(gen, prompt=f"user {i}"))["track_id"] for i in range(4)]
        before = d.call("radio_status")
        ping, busy, t_end = [], [], time.monotonic() + args.seconds
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            d.call("ping")
            ping.append(time.monotonic() - t0)
            if len(ping) % 10 == 0:
                busy.append(d.call("status")["running"] is not None)
            time.sleep(0.1)
        after = d.call("radio_status")
        for tid in users:
            d.call("cancel", {"track_id": tid})
        d.call("radio_stop")
    finally:
        d.close()
    ms = np.array(ping) * 1000
    return {"mode": "process", "seconds": args.seconds,
            "underruns": after["underruns"] - before["underruns"],
            "min_margin_ms": after["min_margin_ms"], "radio_state": after["state"],
            "generating_fraction": round(float(np.mean(busy)), 2) if busy else None,
            "ping_ms": {"n": len(ms), "p50": round(float(np.percentile(ms, 50)), 1),
                        "p95": round(float(np.percentile(ms, 95)), 1),
                        "max": round(float(ms.max()), 1)}}


def run_inprocess(ckpt: Path, args) -> dict:
    from lofi.acestep.pipeline import Pipeline
    from lofi.engines import create_engine
    from lofi.errors import Cancelled
    from lofi.mixer_process import _Player
    from lofi.params import GenerateParams

    tmp = Path(tempfile.mkdtemp(prefix="radio-bench-"))
    tone = tmp / "tone.wav"
    _tone(tone, 20)
    pipeline = Pipeline(ckpt, create_engine(ckpt, args.engine, "fp32", "cpu"))
    stop = threading.Event()
    jobs = []

    def generate():
        i = 0
        while not stop.is_set():
            gp = GenerateParams(f"user {i}", args.duration, infer_steps=args.steps, seed=i).validate()
            t0 = time.monotonic()
            try:
                pipeline.generate(gp, tmp / f"{i}.wav", cancel=stop.is_set)
            except Cancelled:
                return
            jobs.append(time.monotonic() - t0)
            i += 1

    gp = GenerateParams("warm-up", args.duration, infer_steps=1, seed=0).validate()
    pipeline.generate(gp, tmp / "warm.wav")  # loading and first-run costs out of the stretch
    player = _Player("null", 1.0, "loop", 80.0, open(os.devnull, "wb"))
    player.handle({"cmd": "queue", "token": "tone", "path": str(tone)})
    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    time.sleep(args.seconds)
    stop.set()
    stats = player.stats()
    player.close()
    worker.join(600)
    return {"mode": "inprocess", "seconds": args.seconds, "underruns": stats["underruns"],
            "min_margin_ms": stats["min_margin_ms"], "jobs_done": len(jobs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--engine", default="mlx")
    ap.add_argument("--mode", choices=("both", "process", "inprocess"), default="both")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
           "load_avg_at_start": os.getloadavg(), "checkpoint": str(args.checkpoint),
           "command": "python benchmarks/radio_underruns.py " + " ".join(argv or sys.argv[1:]),
           "results": []}
    for mode in (("process", "inprocess") if args.mode == "both" else (args.mode,)):
        r = (run_process if mode == "process" else run_inprocess)(args.checkpoint, args)
        r["load_avg_after"] = os.getloadavg()
        print(json.dumps(r), flush=True)
        out["results"].append(r)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    os._exit(0)  # an engine thread may still be inside a native call


if __name__ == "__main__":
    sys.exit(main())

"""Progress accuracy of the real daemon at mid size (issue 12): how far each generation_progress
is from the truth, from step 3 on, for a first-ever job, a second job, and the first job of a
restarted daemon (which starts from the estimates the first daemon saved).

    PYTHONPATH=. python benchmarks/progress_mid.py [--checkpoint DIR] [--duration 10] [--steps 27]
                                                   [--engine mlx] [--json OUT]

The checkpoint (default: made once under the system temp folder) is the synthetic mid-size one
in the Hugging Face layout (`python -m lofi.acestep.synthetic_hf DIR --size mid`). Truth is
measured on the client side: the share of the job's wall time (generation_start to
generation_complete, as received) that had passed when a notification arrived, against its
`percent`; the time actually left against its `eta_sec`, as a share of the job's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemon_util import Daemon  # noqa: E402
from tests.progress_truth import truth_errors  # noqa: E402


def run_job(d: Daemon, seed: int, duration: float, steps: int) -> dict:
    r = d.call("generate", {"prompt": "progress at mid size", "duration_sec": duration,
                            "infer_steps": steps, "seed": seed})
    kind, done = d.end(r["track_id"], timeout=3600)
    if kind != "complete":
        raise SystemExit(f"job failed: {done}")
    errs = truth_errors(d, r["track_id"])
    pts, eta = [e[0] for e in errs], [e[1] for e in errs]
    start = [t for t, _ in d.events("generation_start", r["track_id"], with_times=True)][0]
    trail = [[round(t - start, 2), p["stage"], p.get("step"), p["percent"], p["eta_sec"]]
             for t, p in d.events("generation_progress", r["track_id"], with_times=True)]
    return {"notifications": len(errs), "percent_err_max": round(max(pts), 1),
            "percent_err_median": round(statistics.median(pts), 1),
            "eta_err_max_pct": round(100 * max(eta), 1),
            "eta_err_median_pct": round(100 * statistics.median(eta), 1),
            "job_sec": round(done.get("generation_time_sec", 0.0), 1),
            "until_complete_sec": round([t for t, _ in d.events("generation_complete", r["track_id"],
                                                                with_times=True)][0] - start, 2),
            "trail": trail}  # [seconds since start, stage, step, percent, eta_sec]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=27)
    ap.add_argument("--engine", default="mlx")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        from lofi.acestep.synthetic_hf import make_hf_checkpoint
        ckpt = Path(tempfile.gettempdir()) / "lofi-synthetic-hf-mid"
        if not (ckpt / "ace_step_transformer" / "config.json").is_file():
            make_hf_checkpoint(ckpt, "mid")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "ace-step").symlink_to(Path(ckpt).resolve(), target_is_directory=True)
        env = {"LOFI_ENGINE": args.engine}
        out = {}
        with Daemon(home, env=env) as d:
            out["first_ever"] = run_job(d, 1, args.duration, args.steps)
            out["second"] = run_job(d, 2, args.duration, args.steps)
        with Daemon(home, env=env) as d:
            out["after_restart"] = run_job(d, 3, args.duration, args.steps)
    out["config"] = {"duration_sec": args.duration, "steps": args.steps, "engine": args.engine,
                     "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m lofi_mlx.bench`: time and memory of one generation, stage by stage.

Runs on the installed model, a given checkpoint, or a synthetic one (real configuration, random
weights; speed and memory do not depend on the values). One warm-up run is excluded; the figures
are the median (and min-max spread) of the timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lofi.params import CFG_TYPES, PRECISIONS, SCHEDULERS, GenerateParams


def _rss_peak_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak_bytes()


def one_run(pipeline, params: GenerateParams, out_dir: Path, estimator) -> dict:
    """One generation through the real pipeline; stages timed from its progress reports, network
    loads from the engine's own counters, and the daemon's ETA estimator followed step by step."""
    from lofi.daemon.backends import model_id
    from lofi.daemon.jobs import Job, ProgressTracker
    from lofi.progress import model_key

    engine = pipeline.engine
    engine.load_times.clear()
    job = Job("bench", params, "normal", "ace-step", engine.name, engine.precision, 0)
    tracker = ProgressTracker(job, estimator, send=lambda *a: None, clock=time.monotonic)
    tracker.clock_of_job.key = model_key("ace-step", engine.name, engine.device, engine.precision,
                                         model_id(pipeline.checkpoint))
    events = []  # (time, stage, step, eta)
    stage_peak = {}  # engine memory peak per stage (the engine's own counter, reset at each stage)

    def close_stage():
        if events and hasattr(engine, "reset_peak"):
            st = events[-1][1]
            stage_peak[st] = max(stage_peak.get(st, 0), int(engine.memory().get("peak", 0)))
            engine.reset_peak()

    def progress(stage, step, total, fraction):
        if not events or events[-1][1] != stage:
            close_stage()
        tracker(stage, step, total, fraction)
        events.append((time.monotonic(), stage, step, job.eta_sec))

    if hasattr(engine, "reset_peak"):
        engine.reset_peak()
    job.started = start = time.monotonic()
    info = pipeline.generate(params, out_dir / "bench.wav", progress=progress)
    end = time.monotonic()
    close_stage()
    estimator.learn(tracker.clock_of_job.key, params.duration_sec, tracker.clock_of_job.segments(end))

    firsts = {}
    for t, stage, _, _ in events:
        firsts.setdefault(stage, t)
    order = [st for st in ("text_encoding", "diffusion", "dcae_decode", "vocoder", "writing")
             if st in firsts]
    bounds = [firsts[st] for st in order] + [end]
    loads = dict(engine.load_times)
    owner = {"text_encoder": "text_encoding", "transformer": "diffusion", "dcae": "dcae_decode",
             "vocoder": "vocoder"}
    t = {f"load.{k}": v for k, v in loads.items()}
    for st, a, b in zip(order, bounds, bounds[1:]):
        t[st] = b - a - sum(v for k, v in loads.items() if owner.get(k) == st)
    t.pop("writing", None)
    t["resample"] = info["timings"]["resample_sec"]
    t["write"] = info["timings"]["write_sec"]
    diff = [(tt, step) for tt, stage, step, _ in events if stage == "diffusion"]
    from lofi.acestep.sampler.guidance import guidance_window
    lo, hi = guidance_window(params.infer_steps, params.guidance_interval)
    guided = params.guidance_scale not in (0.0, 1.0)
    steps = []
    for (t0, _), (t1, step) in zip(diff, diff[1:]):  # evaluation k is guided iff lo <= k < hi
        steps.append({"step": step, "sec": t1 - t0, "guided": guided and lo <= step - 1 < hi})
    if steps:  # the first interval also holds the DiT's load and the conditions
        steps[0]["sec"] -= loads.get("transformer", 0.0)
    eta = [{"step": step, "eta_sec": e, "true_remaining_sec": end - tt}
           for tt, stage, step, e in events if stage == "diffusion" and step]
    return {"timings": t, "steps": steps, "total_sec": end - start,
            "rtf": params.duration_sec / (end - start), "eta": eta, "stage_peak_bytes": stage_peak,
            "engine_memory": engine.memory(), "rss_idle_after": _rss_now_bytes(),
            "loaded_after": list(engine.loaded()),
            "weight_bytes": dict(getattr(engine, "weight_bytes", {}))}


def summarise(runs: list[dict], params, meta) -> dict:
    def agg(vals):
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    keys = [k for k in runs[0]["timings"] if all(k in r["timings"] for r in runs)]
    per_step = [s["sec"] for r in runs for s in r["steps"]]
    guided = [s["sec"] for r in runs for s in r["steps"] if s["guided"]]
    plain = [s["sec"] for r in runs for s in r["steps"] if not s["guided"]]
    return {
        "meta": meta,
        "params": params.to_dict(),
        "stages": {k: agg([r["timings"][k] for r in runs]) for k in keys},
        "step_sec": agg(per_step),
        "guided_step_sec": agg(guided) if guided else None,
        "unguided_step_sec": agg(plain) if plain else None,
        "total_sec": agg([r["total_sec"] for r in runs]),
        "rtf": agg([r["rtf"] for r in runs]),
        "peak_rss_bytes": _rss_peak_bytes(),
        "engine_peak_bytes": max(max(r["stage_peak_bytes"].values(), default=0) for r in runs),
        "stage_peak_bytes": {k: max(r["stage_peak_bytes"].get(k, 0) for r in runs)
                             for k in runs[0]["stage_peak_bytes"]},
        "rss_idle_after_bytes": runs[-1]["rss_idle_after"],
        "weight_bytes": runs[-1].get("weight_bytes", {}),
        "runs": runs,
    }


def print_table(res: dict, out=sys.stdout) -> None:
    m = res["meta"]
    p = res["params"]
    q = f"+q{m['quantize']}" if m.get("quantize") else ""
    print(f"lofi bench: {m['engine']}/{m['device']}/{m['precision']}{q}  checkpoint={m['checkpoint']}  "
          f"{p['duration_sec']:g} s audio, {p['infer_steps']} steps {p['scheduler']}/{p['cfg_type']}, "
          f"{m['runs']} runs (+{m['warmup']} warm-up)", file=out)
    print(f"machine: {m['machine']}", file=out)
    print(f"{'stage':<22}{'median s':>10}{'min':>9}{'max':>9}", file=out)
    for k, v in res["stages"].items():
        print(f"{k:<22}{v['median']:>10.3f}{v['min']:>9.3f}{v['max']:>9.3f}", file=out)
    for k in ("step_sec", "guided_step_sec", "unguided_step_sec"):
        v = res[k]
        if v:
            print(f"{k:<22}{v['median']:>10.3f}{v['min']:>9.3f}{v['max']:>9.3f}", file=out)
    v = res["total_sec"]
    print(f"{'total':<22}{v['median']:>10.3f}{v['min']:>9.3f}{v['max']:>9.3f}", file=out)
    r = res["rtf"]
    print(f"real-time factor (audio s / wall s): {r['median']:.3f} (min {r['min']:.3f}, "
          f"max {r['max']:.3f})", file=out)
    print(f"peak process memory: {res['peak_rss_bytes'] / 2**20:.0f} MiB; "
          f"peak engine memory: {res['engine_peak_bytes'] / 2**20:.0f} MiB ("
          + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in res["stage_peak_bytes"].items())
          + f"); process after the job ({'networks resident' if m.get('keep_loaded') else 'networks dropped'}):"
          f" {res['rss_idle_after_bytes'] / 2**20:.0f} MiB",
          file=out)
    if res["weight_bytes"]:
        print("weights: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in res["weight_bytes"].items()),
              file=out)
    last = res["runs"][-1]
    errs = [("-" if e["eta_sec"] is None else
             f"{abs(e['eta_sec'] - e['true_remaining_sec']) / max(e['true_remaining_sec'], 1e-9) * 100:.0f}%")
            for e in last["eta"]]
    print("ETA error by step (last run, |eta - true remaining| / true remaining): " + " ".join(errs),
          file=out)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def hf_synthetic(out: Path, size: str) -> Path:
    """Write (once) a synthetic checkpoint in the Hugging Face layout; reuses a complete one."""
    from lofi.acestep.synthetic_hf import make_hf_checkpoint
    done = out / "synthetic.json"
    if done.is_file() and json.loads(done.read_text()) == {"size": size}:
        return out
    make_hf_checkpoint(out, size)
    done.write_text(json.dumps({"size": size}))
    return out


def build_parser(engine_default="mlx") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lofi_mlx.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default=engine_default, choices=("mlx", "onnx"))
    ap.add_argument("--backend", default="ace-step", choices=("ace-step", "musicgen"),
                    help="musicgen: see lofi_mlx/bench_musicgen.py")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the installed model")
    ap.add_argument("--synthetic", choices=("full", "mid", "tiny"), default=None,
                    help="random weights at the real configuration (full), real widths with a few "
                         "layers (mid) or the test sizes (tiny)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=27)
    ap.add_argument("--scheduler", default="euler", choices=SCHEDULERS)
    ap.add_argument("--cfg-type", default="apg", choices=CFG_TYPES)
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--quantize", type=int, default=None, choices=(8, 4),
                    help="quantized DiT weights, bits per weight (default: none, full precision)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--keep-loaded", action="store_true",
                    help="keep every network resident between runs (the default drops each after its stage)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results")
    return ap


def main(argv=None, engine_default="mlx") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--backend" in argv and argv[argv.index("--backend") + 1:][:1] == ["musicgen"] \
            or "--backend=musicgen" in argv:
        from lofi_mlx.bench_musicgen import main as musicgen_main
        return musicgen_main(argv)
    args = build_parser(engine_default).parse_args(argv)
    params = GenerateParams("lofi hip hop, jazzy piano, vinyl crackle", args.duration,
                            infer_steps=args.steps, scheduler=args.scheduler, cfg_type=args.cfg_type,
                            seed=1234).validate()
    native = None
    if args.synthetic:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lofi.nvim" / "synthetic"
        if args.engine == "mlx":
            from lofi_mlx.synthetic import make_synthetic
            ckpt = make_synthetic(base / f"{args.synthetic}-{args.precision}", args.synthetic, args.precision)
            native = ckpt / "mlx"
        else:  # the ONNX engine builds its graphs from the Hugging Face layout
            ckpt = hf_synthetic(base / f"{args.synthetic}-hf", args.synthetic)
    else:
        if args.checkpoint is None:
            from lofi.cli import default_checkpoint
            args.checkpoint = default_checkpoint()
        from lofi.checkpoint import check_checkpoint
        ckpt = check_checkpoint(args.checkpoint)
    from lofi.engines import create_engine
    if args.engine == "mlx":
        from lofi_mlx.engine import MLXEngine
        engine = MLXEngine(ckpt, args.precision, args.device, native_dir=native,
                           keep_loaded=args.keep_loaded, quantize=args.quantize)
    else:
        engine = create_engine(ckpt, "onnx", args.precision, args.device, keep_loaded=args.keep_loaded,
                               quantize=args.quantize)
    meta = {"engine": engine.name, "device": engine.device, "precision": engine.precision,
            "quantize": engine.quantize,
            "checkpoint": f"synthetic-{args.synthetic}" if args.synthetic else str(ckpt),
            "runs": args.runs, "warmup": args.warmup, "keep_loaded": args.keep_loaded,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "command": "python -m lofi_mlx.bench "
            + " ".join(argv if argv is not None else sys.argv[1:])}
    from lofi.daemon.jobs import Estimator
    from lofi.acestep.pipeline import Pipeline
    pipeline = Pipeline(ckpt, engine)
    estimator = Estimator()  # learns across runs, as the daemon's does across jobs
    runs = []
    with tempfile.TemporaryDirectory() as td:
        for i in range(args.warmup + args.runs):
            r = one_run(pipeline, params, Path(td), estimator)
            if i >= args.warmup:
                runs.append(r)
            print(f"run {i + 1}/{args.warmup + args.runs}: {r['total_sec']:.2f} s "
                  f"({'warm-up' if i < args.warmup else 'timed'})", file=sys.stderr)
    res = summarise(runs, params, meta)
    if args.json:
        print(json.dumps(res, indent=1, default=float))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

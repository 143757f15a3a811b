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

from .params import CFG_TYPES, PRECISIONS, SCHEDULERS, GenerateParams


def _rss_peak_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak_bytes()


def one_run(engine, ckpt: Path, params: GenerateParams, out_dir: Path) -> dict:
    """One generation with every stage timed separately (the pipeline's order and policy)."""
    from .audio import finalize, frames_for_duration, resample, write_audio
    from .pipeline import _end, sampler_params
    from .sampler.loop import build_conditions, sample
    from .sampler.noise import SeededNoise

    t = {}
    mark = time.perf_counter

    def timed(name, fn, *a, **k):
        t0 = mark()
        r = fn(*a, **k)
        t[name] = mark() - t0
        return r

    start = mark()
    tok = ckpt / "umt5-base" / "tokenizer.json"
    if tok.is_file():
        from .text import PromptTokenizer
        ids, mask = PromptTokenizer(tok).encode([params.prompt])
    else:  # synthetic checkpoints carry no tokenizer: a prompt-sized run of ids
        ids = np.concatenate([np.arange(2, 25), [1]])[None].astype(np.int64)
        mask = np.ones_like(ids)
    timed("load.text_encoder", engine.load, "text_encoder")
    text = timed("text_encoding", engine.encode_text, ids, mask)
    t0 = mark()
    null = engine.encode_text(ids, mask, erg=True)
    t["text_encoding"] += mark() - t0
    _end(engine, "text_encoder")

    sp = sampler_params(params)
    noise = SeededNoise(params.seed or 0)
    frames = frames_for_duration(params.duration_sec)
    x0 = noise.randn((1, 8, 16, frames))
    timed("load.transformer", engine.load, "transformer")
    lyr = np.zeros((1, 1), np.int64)
    conds = timed("conditions", build_conditions, engine, text, null, mask, lyr, lyr, sp)
    steps = []
    last = [mark()]

    def on_step(i, total, info=None):
        now = mark()
        steps.append({"step": i + 1, "sec": now - last[0], "guided": bool((info or {}).get("guided")),
                      "at": now})
        last[0] = now

    t0 = mark()
    last[0] = t0
    lat = sample(engine, conds, x0, sp, noise, on_step=on_step)
    t["diffusion"] = mark() - t0
    _end(engine, "transformer")
    timed("load.dcae", engine.load, "dcae")
    mel = timed("dcae_decode", engine.dcae_decode, lat)
    _end(engine, "dcae")
    timed("load.vocoder", engine.load, "vocoder")
    wave = timed("vocoder", engine.vocode, mel)[0]
    _end(engine, "vocoder")
    w48 = timed("resample", resample, wave, 44100, 48000)
    out = finalize(w48, params.duration_sec)
    timed("write", write_audio, out_dir / "bench.wav", out)
    end = mark()
    total = end - start
    # how far a step-time-based ETA (what the daemon reports) was from the truth at each step
    eta = []
    for k, s in enumerate(steps):
        done = steps[: k + 1]
        mean = sum(x["sec"] for x in done) / len(done)
        est_diff = mean * (len(steps) - len(done))
        true_rem = end - s["at"]
        eta.append({"step": s["step"], "estimate_diffusion_only_sec": est_diff,
                    "true_remaining_sec": true_rem})
    return {"timings": t, "steps": steps, "total_sec": total,
            "rtf": params.duration_sec / total, "eta": eta,
            "engine_memory": engine.memory(), "rss_now": _rss_now_bytes()}


def summarise(runs: list[dict], params, meta) -> dict:
    def agg(vals):
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    keys = list(runs[0]["timings"])
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
        "engine_peak_bytes": max(r["engine_memory"].get("peak", 0) for r in runs),
        "runs": runs,
    }


def print_table(res: dict, out=sys.stdout) -> None:
    m = res["meta"]
    p = res["params"]
    print(f"lofi bench: {m['engine']}/{m['device']}/{m['precision']}  checkpoint={m['checkpoint']}  "
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
          f"peak engine memory: {res['engine_peak_bytes'] / 2**20:.0f} MiB", file=out)
    last = res["runs"][-1]
    errs = [abs(e["estimate_diffusion_only_sec"] + res["stages_post_estimate"] - e["true_remaining_sec"])
            / max(e["true_remaining_sec"], 1e-9) for e in last["eta"]]
    print("ETA error by step (last run, |est - true| / true): "
          + " ".join(f"{x * 100:.0f}%" for x in errs), file=out)


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


def build_parser(engine_default="mlx") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lofi_mlx.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default=engine_default, choices=("mlx", "onnx"))
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
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print machine-readable results")
    return ap


def main(argv=None, engine_default="mlx") -> int:
    args = build_parser(engine_default).parse_args(argv)
    params = GenerateParams("lofi hip hop, jazzy piano, vinyl crackle", args.duration,
                            infer_steps=args.steps, scheduler=args.scheduler, cfg_type=args.cfg_type,
                            seed=1234).validate() if args.duration >= 5 else \
        GenerateParams("lofi", 5.0, infer_steps=args.steps, seed=1234)
    params.duration_sec = args.duration  # sub-5 s runs are allowed here for quick smoke tests
    native = None
    if args.synthetic:
        from .synthetic import make_synthetic
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lofi.nvim" / "synthetic"
        ckpt = make_synthetic(base / f"{args.synthetic}-{args.precision}", args.synthetic, args.precision)
        native = ckpt / "mlx"
    else:
        if args.checkpoint is None:
            from .cli import default_checkpoint
            args.checkpoint = default_checkpoint()
        from .checkpoint import check_checkpoint
        ckpt = check_checkpoint(args.checkpoint)
    from .engines import create_engine
    if args.engine == "mlx":
        from .engine import MLXEngine
        engine = MLXEngine(ckpt, args.precision, args.device, native_dir=native)
    else:
        engine = create_engine(ckpt, "onnx", args.precision, args.device)
    meta = {"engine": engine.name, "device": engine.device, "precision": engine.precision,
            "checkpoint": f"synthetic-{args.synthetic}" if args.synthetic else str(ckpt),
            "runs": args.runs, "warmup": args.warmup, "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "command": "python -m lofi_mlx.bench "
            + " ".join(argv if argv is not None else sys.argv[1:])}
    runs = []
    with tempfile.TemporaryDirectory() as td:
        for i in range(args.warmup + args.runs):
            r = one_run(engine, ckpt, params, Path(td))
            if i >= args.warmup:
                runs.append(r)
            print(f"run {i + 1}/{args.warmup + args.runs}: {r['total_sec']:.2f} s "
                  f"({'warm-up' if i < args.warmup else 'timed'})", file=sys.stderr)
    res = summarise(runs, params, meta)
    post = sum(res["stages"][k]["median"] for k in ("load.dcae", "dcae_decode", "load.vocoder",
                                                   "vocoder", "resample", "write"))
    res["stages_post_estimate"] = post
    if args.json:
        print(json.dumps(res, indent=1, default=float))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

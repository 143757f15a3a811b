"""`python -m lofi_mlx.bench --backend musicgen`: one MusicGen generation timed stage by stage:
network loads, decoder steps per second (each step = one cond+uncond batched decoder call for
every codebook), EnCodec decode, RTF, memory. The first run is a warm-up unless --warmup 0."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _rss_peak_bytes() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak_bytes()


def _machine() -> str:
    import platform
    return f"{platform.system()} {platform.machine()}, {platform.processor() or '?'}, {os.cpu_count()} cores"


def one_run(pipeline, params, out: Path) -> dict:
    eng = pipeline.engine
    eng.load_times.clear()
    eng.reset_peak()
    marks = {}  # stage -> first time seen
    steps = []

    def progress(stage, step, total, fraction):
        now = time.perf_counter()
        marks.setdefault(stage, now)
        if stage == "sampling" and step:
            steps.append((now, step))

    t0 = time.perf_counter()
    info = pipeline.generate(params, out, progress=progress)
    t1 = time.perf_counter()
    n_steps = steps[-1][1] if steps else 0
    # steady-state step rate: from the first timed step (which carries the decoder's load) on
    rate = ((steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0])
            if len(steps) > 1 and steps[-1][0] > steps[0][0] else None)
    sampling = marks.get("decoding", t1) - marks.get("sampling", t0)
    return {"total_sec": t1 - t0, "decoder_steps": n_steps, "steps_per_sec": rate,
            "sampling_sec": sampling, "decode_sec": marks.get("writing", t1) - marks.get("decoding", t1),
            "text_sec": marks.get("sampling", t0) - marks.get("text_encoding", t0),
            "load_sec": dict(eng.load_times), "rtf": info["duration_sec"] / (t1 - t0),
            "engine_peak_bytes": int(eng.memory().get("peak", 0)), "peak_rss_bytes": _rss_peak_bytes(),
            "rss_after_bytes": _rss_now_bytes(), "frames": info["frames"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lofi_mlx.bench --backend musicgen",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="musicgen", choices=("musicgen",))
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the installed model")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--keep-loaded", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from lofi.engines import create_engine
    from lofi.musicgen.hub import check_local
    from lofi.musicgen.params import MusicgenParams
    from lofi.musicgen.pipeline import MusicgenPipeline
    if args.checkpoint is None:
        from lofi.cli import default_checkpoint
        args.checkpoint = default_checkpoint("musicgen")
    ckpt = check_local(args.checkpoint)
    engine = create_engine(ckpt, "mlx", args.precision, args.device, args.threads,
                           keep_loaded=args.keep_loaded, backend="musicgen")
    pipe = MusicgenPipeline(ckpt, engine)
    params = MusicgenParams("lofi hip hop, mellow piano, vinyl crackle", args.duration, seed=1234)
    runs = []
    with tempfile.TemporaryDirectory() as td:
        for i in range(args.warmup + args.runs):
            r = one_run(pipe, params, Path(td) / "t.wav")
            print(f"run {i + 1}/{args.warmup + args.runs}: {r['total_sec']:.2f} s "
                  f"({'warm-up' if i < args.warmup else 'timed'})", file=sys.stderr)
            if i >= args.warmup:
                runs.append(r)
    med = lambda k: statistics.median(r[k] for r in runs if r[k] is not None) if any(
        r[k] is not None for r in runs) else None
    res = {"backend": "musicgen", "engine": engine.name, "device": engine.device,
           "precision": engine.precision, "blas": getattr(engine, "blas", None),
           "checkpoint": str(ckpt), "duration_sec": args.duration, "machine": _machine(),
           "threads": args.threads, "command": "python -m lofi_mlx.bench "
           + " ".join(argv if argv is not None else sys.argv[1:]),
           "total_sec": med("total_sec"), "rtf": med("rtf"), "steps_per_sec": med("steps_per_sec"),
           "sampling_sec": med("sampling_sec"), "decode_sec": med("decode_sec"), "runs": runs}
    if args.json:
        print(json.dumps(res, indent=1, default=float))
        return 0
    r = runs[-1]
    print(f"MusicGen {args.duration:g} s on {res['engine']}/{res['device']}/{res['precision']} "
          f"({res['machine']}), median of {len(runs)}:")
    print(f"  total {res['total_sec']:.2f} s, RTF {res['rtf']:.2f}x real time; decoder "
          f"{r['decoder_steps']} steps at {res['steps_per_sec'] or 0:.2f} steps/s "
          f"({res['sampling_sec']:.2f} s), EnCodec + resample + write {res['decode_sec']:.2f} s")
    print("  loads: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["load_sec"].items())
          + f"; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, engine peak "
          f"{r['engine_peak_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

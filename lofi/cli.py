"""`lofi` command line: generate a track, set up the model. Parsing imports no ML framework."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lofi.errors import LofiError
from lofi.params import CFG_TYPES, FORMATS, PRECISIONS, SCHEDULERS, GenerateParams


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lofi", description="Local AI music with ACE-Step v1.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one track to a file")
    g.add_argument("--prompt", required=True, help="style tags, e.g. 'lofi hip hop, jazzy piano'")
    g.add_argument("--duration", type=float, required=True, help="seconds, 5-240")
    g.add_argument("--steps", type=int, default=27, help="diffusion steps (default 27)")
    g.add_argument("--scheduler", default="euler", help="|".join(SCHEDULERS))
    g.add_argument("--cfg-type", default="apg", help="|".join(CFG_TYPES))
    g.add_argument("--guidance", type=float, default=15.0, help="guidance scale (default 15)")
    g.add_argument("--omega", type=float, default=10.0, help="omega (granularity) scale")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS)
    g.add_argument("--quantize", default=os.environ.get("LOFI_QUANTIZE") or None, type=_quantize,
                   metavar="8|4", help="quantized DiT weights, bits per weight (less memory; "
                   "default: none) [LOFI_QUANTIZE]")
    g.add_argument("--engine", default=os.environ.get("LOFI_ENGINE", "auto"),
                   choices=("auto", "mlx", "onnx"))
    g.add_argument("--device", default=os.environ.get("LOFI_DEVICE", "auto"),
                   choices=("auto", "cpu", "gpu"))
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="ACE-Step folder in the Hugging Face layout (default: $LOFI_HOME/ace-step)")
    g.add_argument("--format", default=None, choices=FORMATS, help="default: from --out's suffix")
    g.add_argument("--keep-loaded", action="store_true", help="keep every network resident")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--out", type=Path, required=True, help="output file (.wav or .flac)")
    try:
        from lofi.cli_setup import add_setup_parser
    except ImportError:
        pass
    else:
        add_setup_parser(sub)
    return ap


def _quantize(raw: str) -> int | None:
    from lofi.settings import _SPECS
    try:
        return _SPECS["quantize"][0](str(raw))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_checkpoint() -> Path:
    from lofi.settings import default_home
    home = os.environ.get("LOFI_HOME")
    return (Path(home) if home else default_home()) / "ace-step"


class ProgressBar:
    def __init__(self, stream=sys.stderr, enabled=True):
        self.stream, self.enabled = stream, enabled
        self.t0 = time.perf_counter()
        self.last = None

    def __call__(self, stage, step, total, fraction):
        if not self.enabled:
            return
        pct = min(int(fraction * 100), 99)
        width = 30
        bar = "#" * (pct * width // 100)
        detail = f" {step}/{total}" if step is not None and total else ""
        line = f"\r[{bar:<{width}}] {pct:3d}% {stage}{detail} {time.perf_counter() - self.t0:6.1f}s"
        if line != self.last:
            self.stream.write(line.ljust(70))
            self.stream.flush()
            self.last = line

    def done(self, msg):
        if self.enabled:
            self.stream.write("\r" + " " * 70 + "\r")
        self.stream.write(msg + "\n")


def cmd_generate(args) -> int:
    fmt = args.format or (args.out.suffix.lstrip(".").lower() or "wav")
    if fmt not in FORMATS:
        raise LofiError("INVALID_PARAMS", f"--out: unsupported format {fmt!r}; use .wav or .flac")
    params = GenerateParams(prompt=args.prompt, duration_sec=args.duration, infer_steps=args.steps,
                            guidance_scale=args.guidance, scheduler=args.scheduler,
                            cfg_type=args.cfg_type, omega_scale=args.omega, seed=args.seed)
    params.validate()
    from lofi.acestep.pipeline import check_model
    ckpt = args.checkpoint or default_checkpoint()
    # refuse a missing or damaged model before any network loads
    check_model(ckpt, "onnx" if args.engine == "onnx" else "mlx", args.precision)
    if not args.out.parent.is_dir():
        raise LofiError("INVALID_PARAMS", f"--out: folder {args.out.parent} does not exist")

    from lofi.engines import create_engine
    from lofi.acestep.pipeline import Pipeline
    engine = create_engine(ckpt, args.engine, args.precision, args.device,
                           keep_loaded=args.keep_loaded, quantize=args.quantize)
    bar = ProgressBar(enabled=not args.quiet and sys.stderr.isatty() or os.environ.get("LOFI_PROGRESS") == "1")
    info = Pipeline(ckpt, engine).generate(params, args.out, fmt=fmt, progress=bar)
    rtf = info["duration_sec"] / max(info["generation_time_sec"], 1e-9)
    bar.done(f"wrote {info['path']} ({info['duration_sec']:.2f} s, {info['sample_rate']} Hz stereo, "
             f"seed {info['seed']}, {info['generation_time_sec']:.1f} s, {rtf:.2f}x real time, "
             f"{info['engine']}/{info['device']}/{info['precision']}"
             + (f", {args.quantize}-bit DiT)" if args.quantize else ")"))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        return args.func(args)
    except LofiError as e:
        print(f"lofi: error [{e.code}]: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lofi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

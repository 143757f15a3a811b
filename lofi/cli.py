"""`lofi` command line: generate a track, set up the model. Parsing imports no ML framework."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lofi.errors import LofiError
from lofi.params import CFG_TYPES, FORMATS, PRECISIONS, SCHEDULERS, TASKS, GenerateParams


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lofi", description="Local AI music with ACE-Step v1.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one track to a file")
    g.add_argument("--prompt", required=True, help="style tags, e.g. 'lofi hip hop, jazzy piano'")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds, 5-240 (text2music, retake; source tasks follow the source)")
    g.add_argument("--task", default="text2music", choices=TASKS)
    g.add_argument("--src", default=None, help="source audio file or cached track id "
                   "(repaint, extend, audio2audio, edit)")
    g.add_argument("--start", type=float, default=None, help="repaint: window start, seconds")
    g.add_argument("--end", type=float, default=None, help="repaint: window end, seconds")
    g.add_argument("--left", type=float, default=0.0, help="extend: seconds added before")
    g.add_argument("--right", type=float, default=0.0, help="extend: seconds added after")
    g.add_argument("--strength", type=float, default=0.5,
                   help="audio2audio: 0-1, how much of the source is kept (default 0.5)")
    g.add_argument("--target-prompt", default=None, help="edit: the prompt to move towards")
    g.add_argument("--edit-n-min", type=float, default=0.0, help="edit: first edited step share")
    g.add_argument("--edit-n-max", type=float, default=1.0, help="edit: last edited step share")
    g.add_argument("--edit-n-avg", type=int, default=1, help="edit: velocity averages per step")
    g.add_argument("--retake-seed", type=int, default=None, help="retake/repaint/extend: "
                   "seed of the variation noise (default: random)")
    g.add_argument("--variance", type=float, default=0.5,
                   help="retake/repaint: 0-1, how far from the original (default 0.5)")
    g.add_argument("--lora", default=None, metavar="NAME[:WEIGHT]",
                   help="LoRA under $LOFI_HOME/lora/NAME/ or a folder, weight default 1.0")
    g.add_argument("--steps", type=int, default=27, help="diffusion steps (default 27)")
    g.add_argument("--scheduler", default="euler", help="|".join(SCHEDULERS))
    g.add_argument("--cfg-type", default="apg", help="|".join(CFG_TYPES))
    g.add_argument("--guidance", type=float, default=15.0, help="guidance scale (default 15)")
    g.add_argument("--omega", type=float, default=10.0, help="omega (granularity) scale")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS)
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
    lo = sub.add_parser("lora", help="LoRA adapters under $LOFI_HOME/lora/")
    lo_sub = lo.add_subparsers(dest="lora_command", required=True)
    lo_sub.add_parser("list", help="list the installed adapters").set_defaults(func=cmd_lora_list)
    try:
        from lofi.cli_setup import add_setup_parser
    except ImportError:
        pass
    else:
        add_setup_parser(sub)
    return ap


def lofi_home() -> Path:
    from lofi.settings import default_home
    home = os.environ.get("LOFI_HOME")
    return Path(home) if home else default_home()


def default_checkpoint() -> Path:
    return lofi_home() / "ace-step"


def parse_lora(spec: str | None) -> tuple[str | None, float]:
    """NAME[:WEIGHT] -> (name, weight); a trailing :number is the weight."""
    if spec is None:
        return None, 1.0
    name, sep, w = spec.rpartition(":")
    if sep and name:
        try:
            return name, float(w)
        except ValueError:
            pass
    return spec, 1.0


def cmd_lora_list(args) -> int:
    from lofi.acestep.lora import list_loras
    root = lofi_home() / "lora"
    found = list_loras(root)
    if not found:
        print(f"no LoRA adapters in {root} (put one in {root}/NAME/pytorch_lora_weights.safetensors)")
    for a in found:
        print(f"{a['name']}\t{a['bytes'] / 1e6:.1f} MB\t{a['path']}")
    return 0


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
    lora, lora_weight = parse_lora(args.lora)
    params = GenerateParams(prompt=args.prompt, duration_sec=args.duration, infer_steps=args.steps,
                            guidance_scale=args.guidance, scheduler=args.scheduler,
                            cfg_type=args.cfg_type, omega_scale=args.omega, seed=args.seed,
                            task=args.task, src_audio=args.src, start_sec=args.start,
                            end_sec=args.end, left_sec=args.left, right_sec=args.right,
                            strength=args.strength, target_prompt=args.target_prompt,
                            edit_n_min=args.edit_n_min, edit_n_max=args.edit_n_max,
                            edit_n_avg=args.edit_n_avg, retake_seed=args.retake_seed,
                            retake_variance=args.variance, lora=lora, lora_weight=lora_weight)
    if params.task in ("repaint", "extend", "audio2audio", "edit") and args.duration is not None:
        raise LofiError("INVALID_PARAMS", f"--duration does not apply to --task {params.task}: "
                        "the length follows the source")
    from lofi.acestep.tasks import resolve
    home = lofi_home()
    resolve(params, home / "tracks", home / "lora")  # the source and LoRA, before any model loads
    from lofi.acestep.pipeline import check_model
    ckpt = args.checkpoint or default_checkpoint()
    # refuse a missing or damaged model before any network loads
    check_model(ckpt, "onnx" if args.engine == "onnx" else "mlx", args.precision)
    if not args.out.parent.is_dir():
        raise LofiError("INVALID_PARAMS", f"--out: folder {args.out.parent} does not exist")

    from lofi.engines import create_engine
    from lofi.acestep.pipeline import Pipeline
    engine = create_engine(ckpt, args.engine, args.precision, args.device,
                           keep_loaded=args.keep_loaded)
    bar = ProgressBar(enabled=not args.quiet and sys.stderr.isatty() or os.environ.get("LOFI_PROGRESS") == "1")
    info = Pipeline(ckpt, engine, home / "tracks", home / "lora").generate(
        params, args.out, fmt=fmt, progress=bar)
    rtf = info["duration_sec"] / max(info["generation_time_sec"], 1e-9)
    bar.done(f"wrote {info['path']} ({info['duration_sec']:.2f} s, {info['sample_rate']} Hz stereo, "
             f"seed {info['seed']}, {info['generation_time_sec']:.1f} s, {rtf:.2f}x real time, "
             f"{info['engine']}/{info['device']}/{info['precision']})")
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

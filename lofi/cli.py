"""`lofi` command line: generate a track, set up the model. Parsing imports no ML framework."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

from lofi.errors import LofiError
from lofi.params import CFG_TYPES, FORMATS, PRECISIONS, SCHEDULERS, TASKS, GenerateParams


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lofi", description="Local AI music with ACE-Step v1 or MusicGen.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one track to a file")
    g.add_argument("--backend", default=os.environ.get("LOFI_BACKEND", "ace-step"),
                   choices=("ace-step", "musicgen"), help="model family (default ace-step)")
    g.add_argument("--prompt", required=True, help="style tags, e.g. 'lofi hip hop, jazzy piano'")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds, 5-240 (musicgen 5-120; ace-step source tasks follow the source)")
    # None = not given: a backend refuses the other backend's parameters by name
    g.add_argument("--task", default=None, choices=TASKS, help="ace-step (default text2music)")
    g.add_argument("--src", default=None, help="ace-step: source audio file or cached track id "
                   "(repaint, extend, audio2audio, edit)")
    g.add_argument("--start", type=float, default=None, help="repaint: window start, seconds")
    g.add_argument("--end", type=float, default=None, help="repaint: window end, seconds")
    g.add_argument("--left", type=float, default=None, help="extend: seconds added before")
    g.add_argument("--right", type=float, default=None, help="extend: seconds added after")
    g.add_argument("--strength", type=float, default=None,
                   help="audio2audio: 0-1, how much of the source is kept (default 0.5)")
    g.add_argument("--target-prompt", default=None, help="edit: the prompt to move towards")
    g.add_argument("--edit-n-min", type=float, default=None, help="edit: first edited step share")
    g.add_argument("--edit-n-max", type=float, default=None, help="edit: last edited step share")
    g.add_argument("--edit-n-avg", type=int, default=None, help="edit: velocity averages per step")
    g.add_argument("--retake-seed", type=int, default=None, help="retake/repaint/extend: "
                   "seed of the variation noise (default: random)")
    g.add_argument("--variance", type=float, default=None,
                   help="retake/repaint: 0-1, how far from the original (default 0.5)")
    g.add_argument("--lora", default=None, metavar="NAME[:WEIGHT]",
                   help="ace-step: LoRA under $LOFI_HOME/lora/NAME/ or a folder, weight default 1.0")
    g.add_argument("--lyrics", default=None,
                   help='ace-step: "[inst]" (instrumental, default) or "" (the reference\'s '
                   'empty-lyrics path)')
    g.add_argument("--steps", type=int, default=None, help="ace-step: diffusion steps (default 27)")
    g.add_argument("--scheduler", default=None, help="ace-step: " + "|".join(SCHEDULERS))
    g.add_argument("--cfg-type", default=None, help="ace-step: " + "|".join(CFG_TYPES))
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: ace-step 15, musicgen 3 or the checkpoint's)")
    g.add_argument("--omega", type=float, default=None, help="ace-step: omega (granularity) scale")
    g.add_argument("--top-k", type=int, default=None, help="musicgen: top-k sampling (default 250)")
    g.add_argument("--temperature", type=float, default=None, help="musicgen: sampling temperature")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--precision", default=os.environ.get("LOFI_PRECISION", "auto"), choices=PRECISIONS,
                   help="auto (default): bf16 on a GPU, fp32 on a CPU")
    g.add_argument("--quantize", default=None, type=_quantize, metavar="8|4",
                   help="ace-step: quantized DiT weights, bits per weight (less memory; default: "
                   "none) [LOFI_QUANTIZE]")
    g.add_argument("--engine", default=os.environ.get("LOFI_ENGINE", "auto"),
                   choices=("auto", "mlx", "onnx"))
    g.add_argument("--device", default=os.environ.get("LOFI_DEVICE", "auto"), type=_device,
                   help="auto | cpu | gpu (cuda and metal mean gpu)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="model folder in the Hugging Face layout (default: $LOFI_HOME/<backend>)")
    g.add_argument("--format", default=None, choices=FORMATS, help="default: from --out's suffix")
    g.add_argument("--keep-loaded", action="store_true", help="keep every network resident")
    g.add_argument("--quiet", action="store_true", help="no progress and no summary line on stderr")
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


def _device(raw: str) -> str:
    from lofi.settings import DEVICE_ALIASES, DEVICES
    v = DEVICE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if v not in DEVICES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DEVICES)} (or cuda, metal)")
    return v


def _quantize(raw: str) -> int | None:
    from lofi.settings import _SPECS
    try:
        return _SPECS["quantize"][0](str(raw)) or 0  # 0: none given, overrides LOFI_QUANTIZE
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _env_quantize() -> int | None:
    raw = os.environ.get("LOFI_QUANTIZE")
    try:
        return _quantize(raw) if raw else None
    except argparse.ArgumentTypeError as e:
        raise LofiError("INVALID_PARAMS", f"LOFI_QUANTIZE {e}") from None


def lofi_home() -> Path:
    from lofi.settings import default_home
    home = os.environ.get("LOFI_HOME")
    return Path(home) if home else default_home()


def default_checkpoint(backend: str = "ace-step") -> Path:
    return lofi_home() / backend


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


def check_out(out: Path) -> None:
    """Refuse an output that is not a plain file we can write, before any network loads (a
    device such as /dev/null would otherwise be replaced by the WAV)."""
    def bad(msg):
        raise LofiError("INVALID_PARAMS", f"--out: {msg}")

    if str(out) == "-":
        bad("writing to stdout is not supported; give a file name ending in .wav or .flac")
    if out.name in ("", ".", ".."):
        bad(f"{str(out)!r} is not a file name")
    try:
        st = out.stat() if os.path.lexists(out) else None
    except OSError as e:
        bad(f"cannot use {out}: {e.strerror}")
    if st is not None and stat.S_ISDIR(st.st_mode):
        bad(f"{out} is a folder; give a file name inside it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        bad(f"{out} is not a regular file (a device, pipe or terminal); lofi only writes files")
    if not out.parent.is_dir():
        bad(f"folder {out.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lofi-probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        bad(f"cannot write in {out.parent}: {e.strerror}")


class Progress:
    """stderr while generating: a bar on a terminal (stage, step, percent, ETA), one plain line
    per stage when stderr is not a terminal, nothing with --quiet. Percent and ETA come from the
    clock (lofi.progress), with the estimates the daemon keeps in LOFI_HOME when it exists."""

    def __init__(self, params, mode: str, checkpoint: Path, stream=None):
        from lofi.progress import Estimator, JobClock
        self.ckpt = checkpoint
        self.home = _home()
        self.estimator = Estimator(self.home if self.home.is_dir() else None)
        self.clock = JobClock(self.estimator, params)
        self.mode, self.stream = mode, stream or sys.stderr
        self.stage = None
        self.last_draw = 0.0
        self.last_step = None

    def __call__(self, stage, step, total, fraction):
        self.clock.update(stage, step, total, fraction)
        pct, eta = self.clock.estimate()
        if self.mode == "lines" and stage != self.stage:
            steps = f" ({self.clock.total_steps} steps)" if stage in ("diffusion", "sampling") else ""
            self.stream.write(f"lofi: {stage}{steps}, {pct}%{_eta(eta, ' ')}\n")
            self.stream.flush()
        elif self.mode == "bar" and (stage != self.stage or time.monotonic() - self.last_draw > 0.1
                                     or (stage == "diffusion" and step != self.last_step)):
            width = 24
            bar = "#" * (pct * width // 100)
            detail = (f" {step}/{total or self.clock.total_steps}"
                      if stage in ("diffusion", "sampling") and step else "")
            line = f"[{bar:<{width}}] {pct:3d}% {stage}{detail}{_eta(eta, '  ')}"
            self.stream.write("\r" + line.ljust(72))
            self.stream.flush()
            self.last_draw = time.monotonic()
        self.stage, self.last_step = stage, step

    def use_engine(self, engine, backend: str = "ace-step") -> None:
        """Estimates are kept per engine, device, precision and model (shared with the daemon)."""
        from lofi.daemon.backends import model_id
        from lofi.progress import model_key
        self.clock.key = model_key(backend, engine.name, engine.device, engine.precision,
                                   model_id(self.ckpt, backend))
        if backend == "ace-step":
            from lofi.acestep.costs import decode_costs
            from lofi.progress import COST_MODEL
            self.clock.cost_model = decode_costs(self.ckpt, COST_MODEL)

    def finish(self, ok: bool) -> None:
        if self.mode == "bar":
            self.stream.write("\r" + " " * 72 + "\r")
        if ok and self.estimator.path is not None and self.clock.key is not None:
            self.estimator.learn(self.clock.key, self.clock.params.duration_sec,
                                 self.clock.segments(time.monotonic()))


def _eta(eta, sep) -> str:
    if eta is None:
        return ""
    m, s = divmod(int(round(eta)), 60)
    return f"{sep}ETA {m}:{s:02d}"


def _home() -> Path:
    from lofi.settings import default_home
    home = os.environ.get("LOFI_HOME")
    return Path(home) if home else default_home()


_FLAGS = {"infer_steps": "--steps", "scheduler": "--scheduler", "cfg_type": "--cfg-type",
          "omega_scale": "--omega", "guidance_scale": "--guidance", "top_k": "--top-k",
          "temperature": "--temperature", "task": "--task", "src_audio": "--src",
          "start_sec": "--start", "end_sec": "--end", "left_sec": "--left", "right_sec": "--right",
          "strength": "--strength", "target_prompt": "--target-prompt", "edit_n_min": "--edit-n-min",
          "edit_n_max": "--edit-n-max", "edit_n_avg": "--edit-n-avg", "retake_seed": "--retake-seed",
          "retake_variance": "--variance", "lora": "--lora", "lyrics": "--lyrics"}
_ARGS = {"infer_steps": "steps", "omega_scale": "omega", "guidance_scale": "guidance",
         "src_audio": "src", "start_sec": "start", "end_sec": "end", "left_sec": "left",
         "right_sec": "right", "retake_variance": "variance"}


def _given(args) -> dict:
    """The generation flags given on the command line, by parameter name."""
    vals = {k: getattr(args, _ARGS.get(k, k)) for k in _FLAGS}
    return {k: v for k, v in vals.items() if v is not None}


def _refuse_foreign(backend: str, given: dict) -> None:
    from lofi.musicgen.params import foreign_params
    bad = foreign_params(backend, given)
    if bad:
        other = "ACE-Step" if backend == "musicgen" else "MusicGen"
        raise LofiError("INVALID_PARAMS", f"{', '.join(_FLAGS[k] for k in bad)}: {other}-only, "
                        f"not accepted with --backend {backend}")


def cmd_generate(args) -> int:
    fmt = args.format or (args.out.suffix.lstrip(".").lower() or "wav")
    if fmt not in FORMATS:
        raise LofiError("INVALID_PARAMS", f"--out: unsupported format {fmt!r}; use .wav or .flac")
    given = _given(args)
    _refuse_foreign(args.backend, given)
    if args.backend == "musicgen":
        if args.quantize:
            raise LofiError("INVALID_PARAMS", "--quantize: ACE-Step-only (quantized DiT weights), "
                            "not accepted with --backend musicgen")
        from lofi.cli_musicgen import generate_musicgen
        return generate_musicgen(args, given, fmt, Progress,
                                 args.checkpoint or default_checkpoint("musicgen"))
    if "lora" in given:
        given["lora"], given["lora_weight"] = parse_lora(given["lora"])
    params = GenerateParams(prompt=args.prompt, duration_sec=args.duration, seed=args.seed, **given)
    if params.task in ("repaint", "extend", "audio2audio", "edit") and args.duration is not None:
        raise LofiError("INVALID_PARAMS", f"--duration does not apply to --task {params.task}: "
                        "the length follows the source")
    params.validate()
    quantize = (args.quantize if args.quantize is not None else _env_quantize()) or None
    from lofi.acestep.lora import refuse_quantized
    refuse_quantized(params.lora, quantize)
    check_out(args.out)
    from lofi.acestep.tasks import resolve
    home = lofi_home()
    resolve(params, home / "tracks", home / "lora")  # the source and LoRA, before any model loads
    from lofi.acestep.pipeline import check_model
    ckpt = args.checkpoint or default_checkpoint()
    from lofi.engines import create_engine
    from lofi.acestep.pipeline import Pipeline
    # creating the engine loads no network; it settles the device and what `auto` means there
    engine = create_engine(ckpt, args.engine, args.precision, args.device,
                           keep_loaded=args.keep_loaded, quantize=quantize)
    # refuse a missing or damaged model before any network loads
    check_model(ckpt, engine.name, engine.precision)
    mode = "off" if args.quiet else "bar" if sys.stderr.isatty() else "lines"
    progress = Progress(params, mode, ckpt)
    progress.use_engine(engine)
    try:
        info = Pipeline(ckpt, engine, home / "tracks", home / "lora").generate(
            params, args.out, fmt=fmt, progress=progress)
    except BaseException:
        progress.finish(ok=False)
        raise
    progress.finish(ok=True)
    rtf = info["duration_sec"] / max(info["generation_time_sec"], 1e-9)
    if not args.quiet:
        q = f", {quantize}-bit DiT" if quantize else ""
        print(f"wrote {info['path']} ({info['duration_sec']:.2f} s, {info['sample_rate']} Hz stereo, "
              f"seed {info['seed']}, {info['generation_time_sec']:.1f} s, {rtf:.2f}x real time, "
              f"{info['engine']}/{info['device']}/{info['precision']}{q})", file=sys.stderr)
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
    except OSError as e:  # e.g. the disk filled up while writing
        print(f"lofi: error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

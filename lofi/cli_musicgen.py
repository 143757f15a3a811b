"""`lofi generate --backend musicgen`: the MusicGen path of the command line."""

from __future__ import annotations

import os
import sys

from lofi.errors import LofiError


def generate_musicgen(args, given: dict, fmt: str, progress_bar, ckpt) -> int:
    from lofi.musicgen.params import MusicgenParams
    params = MusicgenParams(prompt=args.prompt, duration_sec=args.duration, seed=args.seed,
                            **{k: v for k, v in given.items()
                               if k in ("guidance_scale", "top_k", "temperature")}).validate()
    from lofi.musicgen.hub import check_local
    check_local(ckpt)  # a missing or damaged folder is refused before any network loads
    if not args.out.parent.is_dir():
        raise LofiError("INVALID_PARAMS", f"--out: folder {args.out.parent} does not exist")
    from lofi.engines import create_engine
    from lofi.musicgen.pipeline import MusicgenPipeline
    engine = create_engine(ckpt, args.engine, args.precision, args.device,
                           keep_loaded=args.keep_loaded, backend="musicgen")
    bar = progress_bar(enabled=not args.quiet and sys.stderr.isatty()
                       or os.environ.get("LOFI_PROGRESS") == "1")
    info = MusicgenPipeline(ckpt, engine).generate(params, args.out, fmt=fmt, progress=bar)
    rtf = info["duration_sec"] / max(info["generation_time_sec"], 1e-9)
    bar.done(f"wrote {info['path']} ({info['duration_sec']:.2f} s, {info['sample_rate']} Hz stereo, "
             f"MusicGen, seed {info['seed']}, {info['frames']} frames, "
             f"{info['generation_time_sec']:.1f} s, {rtf:.2f}x real time, "
             f"{info['engine']}/{info['device']}/{info['precision']})")
    return 0

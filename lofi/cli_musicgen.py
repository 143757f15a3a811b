"""`lofi generate --backend musicgen`: the MusicGen path of the command line."""

from __future__ import annotations

import sys

from lofi.errors import LofiError


def generate_musicgen(args, given: dict, fmt: str, progress_cls, ckpt) -> int:
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
    mode = "off" if args.quiet else "bar" if sys.stderr.isatty() else "lines"
    progress = progress_cls(params, mode, ckpt)
    progress.use_engine(engine, "musicgen")
    try:
        info = MusicgenPipeline(ckpt, engine).generate(params, args.out, fmt=fmt, progress=progress)
    except BaseException:
        progress.finish(ok=False)
        raise
    progress.finish(ok=True)
    rtf = info["duration_sec"] / max(info["generation_time_sec"], 1e-9)
    if args.quiet:
        return 0
    print(f"wrote {info['path']} ({info['duration_sec']:.2f} s, {info['sample_rate']} Hz stereo, "
          f"MusicGen, seed {info['seed']}, {info['frames']} frames, "
          f"{info['generation_time_sec']:.1f} s, {rtf:.2f}x real time, "
          f"{info['engine']}/{info['device']}/{info['precision']})", file=sys.stderr)
    return 0

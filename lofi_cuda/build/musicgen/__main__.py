"""`python -m lofi_cuda.build.musicgen CHECKPOINT OUT_DIR [--precision fp32|fp16]`."""

import argparse
import sys
import time
from pathlib import Path

from lofi.errors import LofiError

from lofi_cuda.build import PRECISIONS
from lofi_cuda.build.musicgen import build_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lofi_cuda.build.musicgen",
                                 description="Make the ONNX engine's MusicGen graphs from a checkpoint.")
    ap.add_argument("checkpoint", type=Path, help="MusicGen checkpoint folder (transformers Hub layout)")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        build_all(args.checkpoint, args.out_dir, args.precision)
    except LofiError as e:
        print(f"lofi_cuda.build.musicgen: {e.code}: {e.message}", file=sys.stderr)
        return 1
    print(f"built 5 graphs ({args.precision}) in {args.out_dir} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

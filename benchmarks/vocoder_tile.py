"""The MLX vocoder's decoding window: working set and time per window length, one process.

    PYTHONPATH=. python benchmarks/vocoder_tile.py [--size mid] [--seconds 30] [--tiles 2048 1024 512]

The vocoder is built at the synthetic checkpoint's configuration (`mid` and `full` have the real
vocoder) with random weights; a random stereo mel of `--seconds` is decoded with each window
length in turn. "peak" is MLX's peak counter above what was allocated before the decode (the
weights and the mel), after clearing MLX's buffer cache.
"""

from __future__ import annotations

import argparse
import time

from lofi.acestep.synthetic_hf import configs
from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig
from lofi_mlx.acestep.native import construct
from lofi_mlx.mlxrt import mx
from lofi_mlx.synthetic import _randomise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid", choices=("full", "mid", "tiny"))
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tiles", type=int, nargs="+", default=[2048, 1024, 512])
    args = ap.parse_args()
    cfgs, lyric = configs(args.size)
    model = construct("vocoder", cfgs["vocoder"], lyric=LyricEncoderConfig(**lyric))
    _randomise(model, mx.float32)
    mel = mx.random.normal((2, 128, int(args.seconds * 44100 / 512))) * 0.1
    mx.eval(mel)
    print(f"halo {model.receptive_field()} mel frames each side", flush=True)
    for tile in args.tiles:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t = time.perf_counter()
        y = model.decode(mel, chunk_frames=tile)
        mx.eval(y)
        print(f"tile {tile}: peak {(mx.get_peak_memory() - base) / 2**30:.2f} GiB above the weights, "
              f"{time.perf_counter() - t:.1f} s, output {tuple(y.shape)}", flush=True)
        del y


if __name__ == "__main__":
    main()

"""The decoders' (and the DCAE encoder's) memory at length, MLX and ONNX Runtime engines (issue 11).

    PYTHONPATH=. python benchmarks/decode_memory.py --checkpoint HF_CHECKPOINT
        [--stages dcae vocoder dcae_encoder] [--seconds 30 120 240] [--engines mlx onnx] [--json OUT]

HF_CHECKPOINT: a checkpoint in the Hugging Face layout, e.g. the synthetic mid-size one
(`python -m lofi.acestep.synthetic_hf DIR --size mid`: the real DCAE widths). Each (engine,
length, stage) runs in a fresh process: load the decoder (fp32), reset the kernel's peak-RSS
mark, decode random latents (DCAE) or a random log-mel (vocoder, both channels; the encoder) of
that length through the engine's own `dcae_decode` / `vocode` / `dcae_encode` (their time windows
and defaults), and report the peak RSS of the stage above the process before the load
(weights + working set + output), plus MLX's own peak. ONNX: the engine's `dcae_decode` graph
graphs are built once into a scratch folder (a full setup is not needed for two graphs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(engine: str, stage: str, checkpoint: Path, seconds: float, graphs: Path | None) -> dict:
    import numpy as np

    from lofi.audio import frames_for_duration
    frames = frames_for_duration(seconds)
    rng = np.random.default_rng(0)
    if stage == "dcae":
        x = rng.standard_normal((1, 8, 16, frames)).astype(np.float32)
    else:  # a log-mel in the DCAE's output range (the vocoder's and the encoder's input)
        x = rng.uniform(-11.0, 3.0, (1, 2, 128, 8 * frames)).astype(np.float32)
    before = _status("VmRSS")
    if engine == "mlx":
        from lofi_mlx.engine import MLXEngine
        eng = MLXEngine(checkpoint, "fp32", "cpu")
    else:
        from lofi_cuda.engine import ONNXEngine
        eng = ONNXEngine(checkpoint, "fp32", "cpu")
        eng._graph_dir = graphs  # the one graph built by the parent
    eng.load(stage)
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if engine == "mlx":
        from lofi_mlx.mlxrt import mx
        mx.reset_peak_memory()
    t0 = time.perf_counter()
    run = {"dcae": eng.dcae_decode, "vocoder": eng.vocode, "dcae_encoder": eng.dcae_encode}[stage]
    y = run(x)
    wall = time.perf_counter() - t0
    out = {"engine": engine, "stage": stage, "seconds": seconds, "frames": frames,
           "wall_s": round(wall, 1), "rss_before_load": before, "rss_after_load": loaded,
           "rss_peak": _status("VmHWM"), "stage_peak_above_start": _status("VmHWM") - before,
           "output_bytes": int(y.nbytes)}
    if engine == "mlx":
        out["mlx_peak"] = int(mx.get_peak_memory())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--seconds", type=float, nargs="+", default=[30.0, 120.0, 240.0])
    ap.add_argument("--engines", nargs="+", default=["mlx", "onnx"], choices=["mlx", "onnx"])
    ap.add_argument("--stages", nargs="+", default=["dcae"], choices=["dcae", "vocoder", "dcae_encoder"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, stage, seconds, graphs = args.child
        print(json.dumps(child(engine, stage, args.checkpoint, float(seconds),
                               Path(graphs) if graphs else None)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="lofi-decode-mem-") as tmp:
        graphs = ""
        if "onnx" in args.engines:
            from lofi_cuda.build import dcae, vocoder
            from lofi_cuda.build.graph import F32
            if "dcae" in args.stages:
                dcae.build(args.checkpoint, Path(tmp), F32, "decoder")
            if "vocoder" in args.stages:
                vocoder.build(args.checkpoint, Path(tmp), F32)
            if "dcae_encoder" in args.stages:
                dcae.build(args.checkpoint, Path(tmp), F32, "encoder")
            graphs = tmp
        for stage, engine, s in ((st, e, s) for st in args.stages for e in args.engines
                                 for s in args.seconds):
            cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint),
                   "--child", engine, stage, str(s), graphs]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            weights = (row["rss_after_load"] - row["rss_before_load"]) / 2**30
            extra = f", MLX peak {row['mlx_peak'] / 2**30:.2f} GiB" if "mlx_peak" in row else ""
            print(f"{stage:7} {engine:4} {s:5.0f} s: stage peak "
                  f"{row['stage_peak_above_start'] / 2**30:.2f} GiB above the process before loading "
                  f"(weights {weights:.2f} GiB){extra}, {row['wall_s']} s", flush=True)
    if args.json:
        meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

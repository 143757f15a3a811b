"""Decoding speed on this CPU, side by side: the torch port (what the reference computes, run
whole-length as the reference does), ONNX Runtime and MLX engines (issue 16, goal 1).

    PYTHONPATH=. python benchmarks/decoders_cpu.py --checkpoint HF_CHECKPOINT
        [--seconds 10 30 60] [--engines torch onnx mlx] [--threads 2] [--json OUT]

HF_CHECKPOINT: a checkpoint in the Hugging Face layout whose DCAE and vocoder are full size, e.g.
the synthetic mid one (`python -m lofi.acestep.synthetic_hf DIR --size mid`). Each (engine,
length) runs in a fresh process with `--threads` threads: load the DCAE decoder and the vocoder
(fp32), one untimed 2 s warm-up, then random latents of that length decoded to the log-mel and
the mel (both channels) to audio, each stage timed. The engines run through their own
`dcae_decode` / `vocode` (time windows, defaults); the torch port runs `DCAEDecode` and `Vocoder`
on the whole length under `torch.inference_mode`. Rows are printed as they finish, with the
seconds of decoding per second of audio and the ratio to the torch port at the same length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(engine: str, checkpoint: Path, seconds: float, graphs: Path | None, threads: int) -> dict:
    import numpy as np

    from lofi.audio import frames_for_duration

    def latents(s: float):
        rng = np.random.default_rng(0)
        return rng.standard_normal((1, 8, 16, frames_for_duration(s))).astype(np.float32)

    if engine == "torch":
        import torch

        from convert.torch_port import dcae as tdcae
        from convert.torch_port import vocoder as tvoc
        torch.set_num_threads(threads)
        dec, voc = tdcae.load(checkpoint, "decoder").eval(), tvoc.load(checkpoint).eval()

        def dcae_decode(z):
            with torch.inference_mode():
                return dec(torch.from_numpy(z)).numpy()

        def vocode(mel):
            b, c, m, f = mel.shape
            with torch.inference_mode():
                return voc(torch.from_numpy(mel.reshape(b * c, m, f))).numpy().reshape(b, c, -1)
    else:
        if engine == "mlx":
            from lofi_mlx.engine import MLXEngine
            eng = MLXEngine(checkpoint, "fp32", "cpu")
        else:
            from lofi_cuda.engine import ONNXEngine
            eng = ONNXEngine(checkpoint, "fp32", "cpu")
            eng._graph_dir = graphs  # the graphs built once by the parent
        eng.load("dcae")
        eng.load("vocoder")
        dcae_decode, vocode = eng.dcae_decode, eng.vocode

    vocode(dcae_decode(latents(2.0)))  # warm-up: kernels, thread pools, first allocations
    z = latents(seconds)
    t0 = time.perf_counter()
    mel = dcae_decode(z)
    t1 = time.perf_counter()
    wave = vocode(mel)
    t2 = time.perf_counter()
    assert np.isfinite(wave).all()
    return {"engine": engine, "seconds": seconds, "dcae_s": round(t1 - t0, 2),
            "vocoder_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
            "samples": int(wave.shape[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    ap.add_argument("--engines", nargs="+", default=["torch", "onnx", "mlx"],
                    choices=["torch", "onnx", "mlx"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, seconds, graphs = args.child
        print(json.dumps(child(engine, args.checkpoint, float(seconds),
                               Path(graphs) if graphs else None, args.threads)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    with tempfile.TemporaryDirectory(prefix="lofi-decoders-") as tmp:
        graphs = ""
        if "onnx" in args.engines:
            from lofi_cuda.build import dcae, vocoder
            from lofi_cuda.build.graph import F32
            dcae.build(args.checkpoint, Path(tmp), F32, "decoder")
            vocoder.build(args.checkpoint, Path(tmp), F32)
            graphs = tmp
        for s in args.seconds:
            for engine in args.engines:
                cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint),
                       "--threads", str(args.threads), "--child", engine, str(s), graphs]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode:
                    raise SystemExit(f"{engine} at {s} s failed:\n{r.stderr[-4000:]}")
                row = json.loads(r.stdout.strip().splitlines()[-1])
                ref = next((x for x in rows if x["engine"] == "torch" and x["seconds"] == s), None)
                if ref:
                    row["vs_torch"] = round(row["total_s"] / ref["total_s"], 2)
                rows.append(row)
                print(f"{engine:5} {s:5.0f} s: DCAE {row['dcae_s']:7.2f} s  vocoder {row['vocoder_s']:7.2f} s"
                      f"  total {row['total_s']:7.2f} s ({row['total_s'] / s:.2f} s per audio second)"
                      + (f", {row['vs_torch']:.2f}x the torch port" if ref else ""), flush=True)
    if args.json:
        from lofi_mlx.bench import machine  # imports no mlx
        meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                "threads": args.threads, "machine": machine()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

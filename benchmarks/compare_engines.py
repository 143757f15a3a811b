"""Compare the MLX and ONNX Runtime engines on this machine at a mid-size synthetic model.

    python benchmarks/compare_engines.py [--seconds 6] [--steps 8] [--dit-layers 2] [--json OUT]

"Mid-size": the real ACE-Step v1 widths and head counts (DiT 2560 wide, 20 heads of 128; UMT5
768 / 12 heads; Conformer 1024 / 16 heads; DCAE channels 128-1024; the real vocoder head) with
a few layers, and random weights. The UMT5 vocabulary is the tiny fixture tokenizer's (320
ids) to keep the files small; it does not change the cost of a step. A synthetic checkpoint in
the Hugging Face layout (config.json + fp16 safetensors) is written to a temporary folder (or
--checkpoint), both engines load it through their normal paths, and the same job runs on each:
text encoding, sampling with the shared sampler (Euler + APG, guided steps batched [cond; null]),
DCAE decode and vocoder, like the daemon's pipeline. Reported per engine: seconds per guided
DiT step (one batch-2 velocity call) and the end-to-end real-time factor (audio seconds / wall
seconds; > 1 is faster than real time). Needs mlx, onnxruntime, onnx (the one-time graph build,
timed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ROOT / "tests" / "fixtures" / "ace_step_tiny" / "checkpoint"


def configs(dit_layers: int, text_layers: int, lyric_blocks: int) -> dict:
    """Real v1 configs (lofi.acestep.synthetic_hf) with fewer layers (spec §1.2)."""
    from lofi.acestep.synthetic_hf import configs as real
    cfg, lyric = real("full")
    cfg["transformer"]["num_layers"] = dit_layers
    cfg["text_encoder"].update(num_layers=text_layers, vocab_size=320)  # the fixture tokenizer's
    cfg["dcae"].update(encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1])
    cfg["vocoder"]["depths"] = [1, 1, 1, 1]
    return {**cfg, "lyric_blocks": lyric_blocks}


def write_checkpoint(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """Config files + random safetensors (the released dtypes) for the four components,
    tokenizer from the fixture."""
    from lofi.acestep.synthetic_hf import LYRIC_FULL, make_hf_checkpoint

    cfgs = {k: cfg[k] for k in ("transformer", "text_encoder", "dcae", "vocoder")}
    lyric = dict(LYRIC_FULL, blocks=cfg["lyric_blocks"])
    return make_hf_checkpoint(folder, seed=seed, tokenizer_from=TINY / "umt5-base", cfgs=cfgs, lyric=lyric)


def run_engine(name: str, checkpoint: Path, seconds: float, steps: int, repeats: int, threads) -> dict:
    from lofi.audio import resample
    from lofi.engines import create_engine
    from lofi.params import GenerateParams
    from lofi.acestep.pipeline import Pipeline

    frames = int(seconds * 44100 / 4096)
    t0 = time.perf_counter()
    eng = create_engine(checkpoint, name, "fp32", "cpu", threads=threads, keep_loaded=True)
    pipe = Pipeline(checkpoint, eng)
    params = GenerateParams(prompt="lofi hip hop, mellow piano", duration_sec=seconds, infer_steps=steps, seed=7)
    # warm-up with the job's shapes: loads every network (builds the ONNX graphs the first
    # time); MLX also compiles its CPU kernels per new shape here (seconds per shape)
    pipe.audio_44k(pipe.latents(GenerateParams(prompt=params.prompt, duration_sec=seconds, infer_steps=2,
                                               seed=1), frames=frames))
    setup = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 16, frames)).astype(np.float32)
    ctx, mask = eng.encode_context(np.zeros((1, 5, 768), np.float32), np.ones((1, 5), np.int64),
                                   np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
    ctx2, mask2 = np.concatenate([ctx, ctx]), np.concatenate([mask, mask])
    per_step = []
    for _ in range(2):  # MLX compiles its CPU kernels per shape on the first calls
        eng.velocity(x, np.array([500.0, 500.0], np.float32), ctx2, mask2, np.array([False, True]))
    for _ in range(repeats):
        a = time.perf_counter()
        eng.velocity(x, np.array([500.0, 500.0], np.float32), ctx2, mask2, np.array([False, True]))
        per_step.append(time.perf_counter() - a)

    t1 = time.perf_counter()
    lat = pipe.latents(params, frames=frames)       # text encoding + sampling
    t2 = time.perf_counter()
    mel = eng.dcae_decode(lat)
    t3 = time.perf_counter()
    wave = eng.vocode(mel)[0]
    t4 = time.perf_counter()
    out = resample(wave, 44100, 48000)
    t5 = time.perf_counter()
    audio_sec = out.shape[-1] / 48000
    return {"engine": name, "device": eng.device, "setup_sec": round(setup, 2),
            "sec_per_guided_step": round(statistics.median(per_step), 4),
            "text_and_sampling_sec": round(t2 - t1, 2), "dcae_sec": round(t3 - t2, 2),
            "vocoder_sec": round(t4 - t3, 2), "resample_sec": round(t5 - t4, 2),
            "end_to_end_sec": round(t5 - t1, 2),
            "audio_sec": round(audio_sec, 3), "rtf": round(audio_sec / (t5 - t1), 3),
            "finite": bool(np.all(np.isfinite(out)))}


def torch_cuda_full(seconds: float = 120.0, steps: int = 27, dtype: str = "fp16") -> dict:
    """Full-size synthetic model (real configs, random weights) through the PyTorch export port
    on CUDA. fp16: what the fp16 graphs compute (a proxy where onnxruntime-gpu is not installed,
    not a measurement of the ONNX engine). bf16: the PyTorch eager baseline, as the reference
    runs (bf16, SDPA cross-attention). The sampler math between steps is left out; each velocity
    is copied to the host as the shared sampler needs it."""
    import torch

    from convert.torch_port import dcae, dit, vocoder
    from convert.torch_port.lyric_encoder import LyricEncoderConfig
    from lofi_cuda import tables

    dev = "cuda"
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    full_dcae = dict(configs(24, 12, 6)["dcae"], encoder_layers_per_block=[2, 2, 3, 3],
                     decoder_layers_per_block=[3, 3, 3, 3])

    def half(m):
        for p in m.parameters():
            p.requires_grad_(False)
            p.data = (p.data * 0.5).to(tdt) if p.dim() >= 2 else p.data.to(tdt)
        return m.eval().to(dev)

    with torch.device(dev):
        torch.manual_seed(0)
        m = half(dit.ACEStepDiT(dit.DiTConfig.from_dict(configs(24, 12, 6)["transformer"]), LyricEncoderConfig()))
        m.time_freqs = m.time_freqs.to(dev)
        dec = half(dcae.DCAEDecode(dcae.DCAEConfig.from_dict(full_dcae)))
        voc = half(vocoder.Vocoder(vocoder.VocoderConfig()))
    T, L = int(seconds * 44100 / 4096), 22
    rope = [torch.from_numpy(a).to(dev) for a in tables.rope_tables(T, 128, 1e6, "fp16")]
    rope_ctx = [torch.from_numpy(a).to(dev) for a in tables.rope_tables(L, 128, 1e6, "fp16")]
    ctx, mask = torch.randn(2, L, 2560, device=dev), torch.ones(2, L, device=dev)
    start, end = int(steps * 0.25), int(steps * 0.75)

    def job(n):
        x = torch.randn(1, 8, 16, T, device=dev)
        dit_sec = 0.0
        for i in range(n):
            b = 2 if start <= i < end else 1
            torch.cuda.synchronize()
            a = time.perf_counter()
            v = m.decode(torch.cat([x] * b), torch.full((b,), 1000.0 * (1 - i / n), device=dev), ctx[:b],
                         mask[:b], torch.tensor([1.0, 0.01][:b], device=dev), *rope, *rope_ctx).cpu()
            dit_sec += time.perf_counter() - a
            x = x - 0.03 * torch.nan_to_num(v[:1]).to(dev)
        torch.cuda.synchronize()
        a = time.perf_counter()
        mel = dec(x.clamp(-3, 3))
        torch.cuda.synchronize()
        b_ = time.perf_counter()
        wave = voc(mel[0]).cpu()
        return dit_sec, b_ - a, time.perf_counter() - b_, wave.shape

    with torch.no_grad():
        job(3)  # warm-up: kernel selection, allocator
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        dit_sec, dcae_sec, voc_sec, shape = job(steps)
        total = time.perf_counter() - t0
    evals = 2 * (end - start) + (steps - (end - start))
    return {"engine": f"torch-port {dtype}", "device": torch.cuda.get_device_name(0),
            "seconds_audio": seconds, "steps": steps, "guided_steps": end - start,
            "sec_per_guided_step": round(2 * dit_sec / evals, 4), "dit_sec": round(dit_sec, 3),
            "dcae_sec": round(dcae_sec, 3), "vocoder_sec": round(voc_sec, 3), "end_to_end_sec": round(total, 3),
            "rtf": round(seconds / total, 2), "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "wave_shape": list(shape)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="audio length of the job (default 6)")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps (default 8: 4 guided)")
    ap.add_argument("--dit-layers", type=int, default=2)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--lyric-blocks", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed batch-2 velocity calls (median)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--engines", nargs="+", default=["mlx", "onnx"], choices=["mlx", "onnx"])
    ap.add_argument("--checkpoint", type=Path, help="reuse/keep the synthetic checkpoint here")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--cuda-full", action="store_true",
                    help="instead: the full-size synthetic model via the torch port, fp16 on CUDA "
                         "(120 s of audio, 27 steps; see torch_cuda_full)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="with --cuda-full")
    args = ap.parse_args(argv)
    if args.cuda_full:
        print(json.dumps(torch_cuda_full(dtype=args.dtype), indent=1))
        return 0

    tmp = None
    if args.checkpoint is None:
        tmp = tempfile.mkdtemp(prefix="lofi-bench-")
        args.checkpoint = Path(tmp) / "checkpoint"
    # the ONNX graphs of a checkpoint outside LOFI_HOME are built under LOFI_HOME/onnx: keep them
    # beside the benchmark's checkpoint, not in the user's LOFI_HOME
    os.environ.setdefault("LOFI_HOME", str(args.checkpoint.parent / "lofi-home"))
    try:
        if not (args.checkpoint / "ace_step_transformer" / "config.json").is_file():
            t0 = time.perf_counter()
            write_checkpoint(args.checkpoint, configs(args.dit_layers, args.text_layers, args.lyric_blocks))
            print(f"synthetic checkpoint written in {time.perf_counter() - t0:.1f} s: {args.checkpoint}",
                  flush=True)
        results = []
        for name in args.engines:
            r = run_engine(name, args.checkpoint, args.seconds, args.steps, args.repeats, args.threads)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU threads, {platform.system()} ({platform.processor() or '?'})"
    print(f"\n{'engine':<8} {'s/guided step':>14} {'end-to-end s':>13} {'RTF':>7}   ({machine}; "
          f"{args.seconds:g} s audio, {args.steps} steps, DiT {args.dit_layers} layers at 2560 wide)")
    for r in results:
        print(f"{r['engine']:<8} {r['sec_per_guided_step']:>14.3f} {r['end_to_end_sec']:>13.2f} {r['rtf']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

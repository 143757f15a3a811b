"""MusicGen on this CPU: lofi's ONNX Runtime and MLX engines against Hugging Face transformers
(eager), same synthetic musicgen-small-sized checkpoint, same thread count, same machine, one run.

    python benchmarks/musicgen_cpu.py [--seconds 10] [--threads 2] [--checkpoint DIR] [--json OUT]
                                      [--sides onnx transformers mlx] [--transformers-path DIR]

The checkpoint: transformers' own MusicgenForConditionalGeneration at the musicgen-small sizes
(decoder 1024 wide, 24 layers, 16 heads, 4 codebooks; T5 at t5-base widths but the tiny fixture
tokenizer's vocabulary, which does not change a step's cost; EnCodec 32 kHz at its real widths),
random weights, saved with save_pretrained (fp32) plus the fixture's tokenizer files. Both sides
load that folder through their normal paths and generate `--seconds` of audio from one prompt
with guidance 3 and top-k 250 sampling (transformers: generate(do_sample=True, top_k=250,
guidance_scale=3, max_new_tokens=frames+3); lofi: its pipeline, which also resamples to 48 kHz
and writes the file; the ONNX graph build is timed apart). Each side runs in its own process, in
the order given; the JSON is rewritten after each. Needs the `reference` extra (or
--transformers-path, a folder put first on the transformers side's PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "musicgen_tiny" / "checkpoint"
PROMPT = "lofi hip hop, mellow piano, vinyl crackle"


def build(folder: Path) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5Config)
    torch.manual_seed(0)
    text = T5Config(vocab_size=320, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    feed_forward_proj="relu")
    dec = MusicgenDecoderConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                ffn_dim=4096, num_codebooks=4, vocab_size=2048)
    aud = EncodecConfig(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
                        num_filters=64, hidden_size=128, codebook_size=2048, use_causal_conv=False,
                        normalize=False, use_conv_shortcut=False)
    cfg = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=aud.to_dict(), decoder=dec.to_dict())
    model = MusicgenForConditionalGeneration(cfg).eval()
    for emb in model.audio_encoder.quantizer.layers:  # zeros at init: make the codec do real work
        emb.codebook.embed.normal_()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    gc = json.loads((tmp / "generation_config.json").read_text()) if (tmp / "generation_config.json").is_file() else {}
    gc.update(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048, do_sample=True,
              guidance_scale=3.0, max_length=1500)
    (tmp / "generation_config.json").write_text(json.dumps(gc, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / f, tmp / f)
    os.replace(tmp, folder)
    return folder


def run_transformers(folder: Path, seconds: float, threads: int) -> dict:
    import resource

    import torch
    from transformers import MusicgenForConditionalGeneration
    from tokenizers import Tokenizer
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # plain eager modules: no Hub kernels (some transformers versions default them on)
    model = MusicgenForConditionalGeneration.from_pretrained(folder, attn_implementation="eager",
                                                             use_kernels=False).eval()
    load = time.perf_counter() - t0
    ids = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids])
    frames = math.ceil(seconds * 50)
    torch.manual_seed(1234)
    with torch.inference_mode():
        t1 = time.perf_counter()
        audio = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                               top_k=250, guidance_scale=3.0, max_new_tokens=frames + 3)
        total = time.perf_counter() - t1
    return {"side": "transformers", "version": __import__("transformers").__version__,
            "torch": torch.__version__, "load_sec": load, "total_sec": total,
            "audio_samples_32k": int(audio.shape[-1]), "rtf": seconds / total,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path,
                    default=Path.home() / ".cache" / "lofi.nvim" / "synthetic" / "musicgen-small")
    ap.add_argument("--sides", nargs="+", default=["onnx", "transformers", "mlx"],
                    choices=("onnx", "transformers", "mlx"))
    ap.add_argument("--transformers-path", default=None)
    ap.add_argument("--also-transformers-threads", type=int, default=None,
                    help="then transformers again at this thread count (`transformers_<n>t`)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    folder = build(args.checkpoint)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    out = {"seconds": args.seconds, "threads": args.threads, "checkpoint": str(folder),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
           "command": " ".join(["python", *sys.argv])}
    sides = [(s, args.threads) for s in args.sides]
    if args.also_transformers_threads:
        sides.append((f"transformers_{args.also_transformers_threads}t", args.also_transformers_threads))
    for side, threads in sides:
        if side.startswith("transformers"):
            tf_env = dict(env, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
                p for p in (args.transformers_path, str(ROOT)) if p))
            cmd = [sys.executable, __file__, "--side-worker", str(folder), str(args.seconds),
                   str(threads)]
        else:
            tf_env = env
            cmd = [sys.executable, str(ROOT / "benchmarks" / "musicgen_engines_cpu.py"), "--worker",
                   str(folder), side, str(args.seconds), str(args.threads)]
        load0 = os.getloadavg()[0]
        r = subprocess.run(cmd, capture_output=True, text=True, env=tf_env, cwd=ROOT)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
        out[side]["loadavg_before_after"] = [load0, os.getloadavg()[0]]
        print(f"{side}: {out[side]['total_sec']:.1f} s", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps(out, indent=1, default=float))
    if "transformers" in out:
        b = out["transformers"]["total_sec"]
        for side in ("onnx", "mlx", f"transformers_{args.also_transformers_threads}t"):
            if side in out:
                a = out[side]["total_sec"]
                print(f"lofi {side} {a:.1f} s vs transformers {b:.1f} s for {args.seconds:g} s: "
                      f"{b / a:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--side-worker":
        print(json.dumps(run_transformers(Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())

"""MusicGen on this CPU: lofi's MLX and ONNX Runtime engines side by side at musicgen-small size.

    python benchmarks/musicgen_engines_cpu.py [--seconds 10] [--threads 2] [--engines mlx onnx]
                                               [--checkpoint DIR] [--json OUT]

The checkpoint is synthetic (numpy only, no torch or transformers): musicgen-small's decoder
(1024 wide, 24 layers, 16 heads, FFN 4096, 4 codebooks), T5 at t5-base widths with the tiny
fixture tokenizer's 320-id vocabulary (a step's cost does not depend on it), EnCodec 32 kHz at
its real widths; random weights, fp32 safetensors in transformers' Hub layout. Each engine runs
in its own process: the MusicGen pipeline (T5, CFG sampling with top-k 250, EnCodec, 32 -> 48 kHz,
file write) for one prompt, after a one-time preparation (ONNX: the graph build) that is timed
apart. Reported: total seconds, real-time factor (audio s / wall s), decoder steps per second,
stage load seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "musicgen_tiny" / "checkpoint"
PROMPT = "lofi hip hop, mellow piano, vinyl crackle"
T5 = dict(vocab_size=320, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
          relative_attention_num_buckets=32, relative_attention_max_distance=128,
          layer_norm_epsilon=1e-6, feed_forward_proj="relu")
DECODER = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
               vocab_size=2048, num_codebooks=4, audio_channels=1, pad_token_id=2048,
               bos_token_id=2048, max_position_embeddings=2048)
ENCODEC = dict(sampling_rate=32000, audio_channels=1, codebook_size=2048, hidden_size=128,
               num_filters=64, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], kernel_size=7,
               last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, compress=2,
               num_lstm_layers=2, pad_mode="reflect", use_causal_conv=False, use_conv_shortcut=False,
               target_bandwidths=[2.2], norm_type="weight_norm", normalize=False)


def _tensors(rng) -> dict:
    w = {}

    def lin(key, cout, cin):
        w[key] = (rng.standard_normal((cout, cin), np.float32) / np.sqrt(cin)).astype(np.float32)

    t, d, a = T5, DECODER, ENCODEC
    w["text_encoder.shared.weight"] = rng.standard_normal((t["vocab_size"], t["d_model"]), np.float32)
    inner = t["num_heads"] * t["d_kv"]
    for i in range(t["num_layers"]):
        b = f"text_encoder.encoder.block.{i}.layer"
        for n in "qkv":
            lin(f"{b}.0.SelfAttention.{n}.weight", inner, t["d_model"])
        lin(f"{b}.0.SelfAttention.o.weight", t["d_model"], inner)
        lin(f"{b}.1.DenseReluDense.wi.weight", t["d_ff"], t["d_model"])
        lin(f"{b}.1.DenseReluDense.wo.weight", t["d_model"], t["d_ff"])
        w[f"{b}.0.layer_norm.weight"] = np.ones(t["d_model"], np.float32)
        w[f"{b}.1.layer_norm.weight"] = np.ones(t["d_model"], np.float32)
    w["text_encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
        rng.standard_normal((32, t["num_heads"]), np.float32)
    w["text_encoder.encoder.final_layer_norm.weight"] = np.ones(t["d_model"], np.float32)
    h = d["hidden_size"]
    lin("enc_to_dec_proj.weight", h, t["d_model"])
    w["enc_to_dec_proj.bias"] = np.zeros(h, np.float32)
    for k in range(d["num_codebooks"]):
        w[f"decoder.model.decoder.embed_tokens.{k}.weight"] = rng.standard_normal((2049, h), np.float32)
        lin(f"decoder.lm_heads.{k}.weight", d["vocab_size"], h)
    for i in range(d["num_hidden_layers"]):
        b = f"decoder.model.decoder.layers.{i}"
        for att in ("self_attn", "encoder_attn"):
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
                lin(f"{b}.{att}.{n}.weight", h, h)
        lin(f"{b}.fc1.weight", d["ffn_dim"], h)
        lin(f"{b}.fc2.weight", h, d["ffn_dim"])
        for n in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            w[f"{b}.{n}.weight"] = np.ones(h, np.float32)
            w[f"{b}.{n}.bias"] = np.zeros(h, np.float32)
    w["decoder.model.decoder.layer_norm.weight"] = np.ones(h, np.float32)
    w["decoder.model.decoder.layer_norm.bias"] = np.zeros(h, np.float32)

    def conv(key, cout, cin, k, transposed=False):
        shape = (cin, cout, k) if transposed else (cout, cin, k)
        w[f"{key}.weight_v"] = rng.standard_normal(shape, np.float32)
        w[f"{key}.weight_g"] = np.ones((shape[0], 1, 1), np.float32)
        w[f"{key}.bias"] = np.zeros(cout, np.float32)

    p = "audio_encoder.decoder.layers"
    ch = a["num_filters"] * 2 ** len(a["upsampling_ratios"])
    conv(f"{p}.0.conv", ch, a["hidden_size"], 7)
    for j in range(a["num_lstm_layers"]):
        s = 1 / np.sqrt(ch)
        for n, shape in (("weight_ih", (4 * ch, ch)), ("weight_hh", (4 * ch, ch)),
                         ("bias_ih", (4 * ch,)), ("bias_hh", (4 * ch,))):
            w[f"{p}.1.lstm.{n}_l{j}"] = rng.uniform(-s, s, shape).astype(np.float32)
    n = 1
    for r in a["upsampling_ratios"]:
        conv(f"{p}.{n + 2}.conv", ch // 2, ch, 2 * r, transposed=True)
        ch //= 2
        conv(f"{p}.{n + 3}.block.1.conv", ch // 2, ch, 3)
        conv(f"{p}.{n + 3}.block.3.conv", ch, ch // 2, 1)
        n += 3
    conv(f"{p}.{n + 2}.conv", 1, ch, 7)
    for q in range(4):
        w[f"audio_encoder.quantizer.layers.{q}.codebook.embed"] = rng.standard_normal((2048, 128), np.float32)
    return w


def build(folder: Path) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.numpy import save_file
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_tensors(np.random.default_rng(0)), str(tmp / "model.safetensors"))
    cfg = {"model_type": "musicgen", "text_encoder": dict(T5, model_type="t5"),
           "decoder": dict(DECODER, model_type="musicgen_decoder"),
           "audio_encoder": dict(ENCODEC, model_type="encodec")}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"decoder_start_token_id": 2048, "pad_token_id": 2048, "do_sample": True,
         "guidance_scale": 3.0, "max_length": 1500}))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / f, tmp / f)
    os.replace(tmp, folder)
    return folder


def run_engine(folder: Path, engine: str, seconds: float, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from lofi.engines import create_engine
    from lofi.musicgen.params import MusicgenParams
    from lofi.musicgen.pipeline import MusicgenPipeline
    eng = create_engine(folder, engine, "fp32", "cpu", threads=threads, backend="musicgen")
    t0 = time.perf_counter()
    if engine == "onnx":
        eng.graph_dir()  # the one-time graph build (cached for later runs)
    prepare = time.perf_counter() - t0
    steps = []
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"musicgen_bench_{engine}.wav"
    info = MusicgenPipeline(folder, eng).generate(
        MusicgenParams(PROMPT, seconds, seed=1234, top_k=250, guidance_scale=3.0), out,
        progress=lambda stage, i, n, frac: steps.append(i) if stage == "sampling" and i else None)
    # one report per decoder call (the step counter restarts with each window)
    t = info["timings"]
    n = len(steps)
    return {"engine": engine, "device": eng.device, "precision": eng.precision,
            "prepare_sec": prepare, "total_sec": info["generation_time_sec"],
            "sampling_sec": t["sampling_sec"], "decode_sec": t["decode_sec"],
            "decoder_steps": n, "steps_per_sec": n / t["sampling_sec"],
            "rtf": seconds / info["generation_time_sec"],
            "load_sec": getattr(eng, "load_times", None),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["mlx", "onnx"], choices=("mlx", "onnx"))
    ap.add_argument("--checkpoint", type=Path,
                    default=Path.home() / ".cache" / "lofi.nvim" / "synthetic" / "musicgen-small")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    folder = build(args.checkpoint)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    out = {"seconds": args.seconds, "threads": args.threads, "checkpoint": str(folder),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}"}
    for e in args.engines:
        r = subprocess.run([sys.executable, __file__, "--worker", str(folder), e, str(args.seconds),
                            str(args.threads)], capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        out[e] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1, default=float))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    for e in args.engines:
        r = out[e]
        print(f"{e}: {r['total_sec']:.1f} s for {args.seconds:g} s (RTF {r['rtf']:.3f}), "
              f"{r['steps_per_sec']:.2f} decoder steps/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(run_engine(Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])),
                         default=float))
        sys.exit(0)
    sys.exit(main())

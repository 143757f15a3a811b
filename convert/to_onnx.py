"""Export ACE-Step v1 to ONNX graphs for the ONNX Runtime engine (lofi_cuda).

    python -m convert.to_onnx CHECKPOINT OUT_DIR [--precision fp32|fp16] [--opset 18]

Six graphs, all with fp32 inputs/outputs (int64 ids and indices) and a dynamic batch and time
axis: text_encoder, dit_encode, dit_decode, dcae_decode, dcae_encode, vocoder (interfaces in
lofi_cuda/graphs.py). fp16 graphs keep the reference's fp32 islands (norm statistics, RoPE
arithmetic, linear-attention sums, softmax; see the torch_port modules). A graph whose weights
pass ~1.8 GB is saved with its tensors in one `<name>.onnx.data` file beside it (protobuf's 2 GB
limit). `manifest.json` is written last: opset, precision, tool versions, model sizes and the
checkpoint files' size, mtime and sha256.

Uses the TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and traces these
plain modules faithfully; every graph is checked against the torch port by tests/test_onnx.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lofi_cuda import graphs as G
from lofi_cuda import tables
from lofi.checkpoint import component_dir, load_component
from lofi.errors import INVALID_PARAMS, LofiError

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000
PRECISIONS = ("fp32", "fp16")


def _t(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x))


def _examples(name: str, model, precision: str) -> tuple:
    """Small example inputs to trace with (sizes chosen unequal so no axis is confused)."""
    B, Nt, Nl, T = 2, 5, 3, 6
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    if name == "text_encoder":
        c = model.config
        return (_t(rng.integers(2, c.vocab_size, (B, Nt))), _t(np.ones((B, Nt), np.int64)),
                _t(tables.t5_buckets(Nt, c.relative_attention_num_buckets, c.relative_attention_max_distance)),
                _t(np.ones(c.num_layers, np.float32)))
    if name == "dit_encode":
        c, lc = model.dit.config, model.dit.lyric_encoder.config
        return (_t(f32(B, Nt, c.text_dim)), _t(np.ones((B, Nt), np.int64)),
                _t(rng.integers(0, c.lyric_vocab, (B, Nl))), _t(np.ones((B, Nl), np.int64)),
                _t(tables.relative_positions(Nl, lc.width, precision)), _t(tables.relative_index(Nl)),
                _t(np.ones(lc.blocks, np.float32)))
    if name == "dit_decode":
        c = model.dit.config
        L = 1 + Nt + Nl
        cos, sin = tables.rope_tables(T, c.head_dim, c.rope_theta, precision)
        cc, sc = tables.rope_tables(L, c.head_dim, c.rope_theta, precision)
        return (_t(f32(B, c.in_channels, c.patch_height, T)), _t(np.array([900.0, 500.0], np.float32)),
                _t(f32(B, L, c.width)), _t(np.ones((B, L), np.float32)), _t(np.array([1.0, 0.01], np.float32)),
                _t(cos), _t(sin), _t(cc), _t(sc))
    if name == "dcae_decode":
        return (_t(f32(1, model.decoder.conv_in.in_channels, 16, T)),)
    if name == "dcae_encode":
        return (_t(f32(1, model.encoder.conv_in.in_channels, 128, 8 * T) - 5.0),)
    if name == "vocoder":
        return (_t(f32(B, model.cfg.input_channels, T) - 5.0),)
    raise ValueError(name)


_DYNAMIC = {
    "text_encoder": {"input_ids": {0: "B", 1: "N"}, "attention_mask": {0: "B", 1: "N"},
                     "buckets": {0: "N", 1: "N"}, "last_hidden_state": {0: "B", 1: "N"}},
    "dit_encode": {"text_hidden": {0: "B", 1: "Nt"}, "text_mask": {0: "B", 1: "Nt"},
                   "lyric_ids": {0: "B", 1: "Nl"}, "lyric_mask": {0: "B", 1: "Nl"}, "pe": {0: "P"},
                   "rel_index": {0: "Nl", 1: "Nl"}, "ctx": {0: "B", 1: "L"}, "ctx_mask": {0: "B", 1: "L"}},
    "dit_decode": {"x": {0: "B", 3: "T"}, "timestep": {0: "B"}, "ctx": {0: "B", 1: "L"},
                   "ctx_mask": {0: "B", 1: "L"}, "q_scale": {0: "B"}, "cos": {0: "T"}, "sin": {0: "T"},
                   "cos_ctx": {0: "L"}, "sin_ctx": {0: "L"}, "velocity": {0: "B", 3: "T"}},
    "dcae_decode": {"latents": {0: "B", 3: "T"}, "mel": {0: "B", 3: "F"}},
    "dcae_encode": {"mel": {0: "B", 3: "F"}, "latents": {0: "B", 3: "T"}},
    "vocoder": {"mel": {0: "B", 2: "F"}, "wave": {0: "B", 1: "S"}},
}


def build_modules(checkpoint: str | Path, precision: str, names=tuple(G.GRAPHS)):
    """Yield (graph name, torch module) one component at a time (bounds peak memory)."""
    from convert.torch_port import dcae, dit, umt5, vocoder
    if "text_encoder" in names:
        yield "text_encoder", umt5.load(checkpoint, precision)
    if "dit_encode" in names or "dit_decode" in names:
        m = dit.load(checkpoint, precision)
        if "dit_encode" in names:
            yield "dit_encode", dit.DiTEncode(m)
        if "dit_decode" in names:
            yield "dit_decode", dit.DiTDecode(m)
        del m
    if "dcae_decode" in names or "dcae_encode" in names:
        cfg, raw = load_component(checkpoint, "dcae")
        src = str(component_dir(checkpoint, "dcae"))
        for name, part in (("dcae_decode", "decoder"), ("dcae_encode", "encoder")):
            if name in names:
                yield name, dcae.from_weights(cfg, raw, part, precision, src)
        del raw
    if "vocoder" in names:
        yield "vocoder", vocoder.load(checkpoint, precision)


def export_graph(name: str, module, precision: str, out_dir: Path, opset: int = OPSET) -> dict:
    """Trace one module to `<out_dir>/<name>.onnx` (+ `.onnx.data` when large)."""
    import onnx
    import torch

    inputs, outputs = G.GRAPHS[name]
    args = _examples(name, module, precision)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw_path = Path(tmp) / f"{name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation and tracer notes
            torch.onnx.export(module, args, str(raw_path), dynamo=False, opset_version=opset,
                              input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes=_DYNAMIC[name], do_constant_folding=True)
        model = onnx.load(str(raw_path), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    path = out_dir / f"{name}.onnx"
    external = weight_bytes > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    spec = {"file": path.name, "external_data": f"{name}.onnx.data" if external else None,
            "inputs": list(inputs), "outputs": list(outputs), "weight_bytes": weight_bytes}
    if name in ("dit_encode", "dit_decode"):
        spec["weights"] = weight_map(module, model)
    return spec


def weight_map(module, model) -> dict:
    """{checkpoint name of a 2-D weight: {"init": its ONNX initializer, "transposed": bool}}.

    Constant folding leaves Linear weights as anonymous, transposed MatMul initializers; matching
    them by value lets the engine feed LoRA-merged weights in place (SessionOptions.add_initializer)
    without exporting again."""
    import hashlib

    from onnx import numpy_helper

    def key(a):
        a = np.ascontiguousarray(a)
        return a.shape, a.dtype.str, hashlib.sha256(a.tobytes()).hexdigest()

    index = {}
    for t in model.graph.initializer:
        if len(t.dims) == 2:
            index.setdefault(key(numpy_helper.to_array(t)), []).append(t.name)
    out = {}
    for pname, p in module.named_parameters():
        if p.ndim != 2 or not pname.endswith(".weight"):
            continue
        w = p.detach().cpu().numpy()
        for transposed, cand in ((True, w.T), (False, w)):
            names = index.get(key(cand), [])
            if len(names) == 1:  # ambiguous (equal tensors) or absent: not addressable
                out[pname.split(".", 1)[1] if pname.startswith("dit.") else pname] = {
                    "init": names[0], "transposed": transposed}
                break
    return out


def _dims(checkpoint) -> dict:
    from convert.torch_port.dit import DiTConfig
    from convert.torch_port.lyric_encoder import LyricEncoderConfig
    from convert.torch_port.umt5 import UMT5Config
    tc = UMT5Config.from_dict(load_component(checkpoint, "text_encoder")[0])
    cfg, raw = load_component(checkpoint, "transformer")
    dc, lc = DiTConfig.from_dict(cfg), LyricEncoderConfig.from_weights(raw)
    return {"text_layers": tc.num_layers, "text_buckets": tc.relative_attention_num_buckets,
            "text_max_distance": tc.relative_attention_max_distance, "lyric_blocks": lc.blocks,
            "lyric_width": lc.width, "dit_layers": dc.num_layers, "dit_width": dc.width,
            "head_dim": dc.head_dim, "rope_theta": dc.rope_theta}


def _versions() -> dict:
    import onnx
    import torch

    import lofi
    v = {"torch": torch.__version__, "onnx": onnx.__version__, "lofi": lofi.__version__,
         "python": platform.python_version(), "exporter": "torch.onnx.export(dynamo=False)"}
    try:
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


def export_all(checkpoint: str | Path, out_dir: str | Path, precision: str = "fp32",
               opset: int = OPSET, log=print) -> dict:
    """Export every graph into `out_dir` (replacing what is there) and write its manifest."""
    if precision not in PRECISIONS:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    described = G.describe_checkpoint(checkpoint)   # hashes first: fails early on a bad checkpoint
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build next to the target and swap it in at the end, so a crash never leaves half a folder
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        specs = {}
        for name, module in build_modules(checkpoint, precision):
            t0 = time.perf_counter()
            specs[name] = export_graph(name, module, precision, work, opset)
            log(f"  {name}: {specs[name]['weight_bytes'] / 1e6:.1f} MB of weights, "
                f"{time.perf_counter() - t0:.1f} s")
            del module
        manifest = {"format": G.FORMAT, "precision": precision, "opset": opset,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
                    "dims": _dims(checkpoint), "graphs": specs, "checkpoint": described}
        (work / G.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        work.chmod(0o755)  # mkdtemp makes it private; the graphs are not secret
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.to_onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="ACE-Step v1 checkpoint folder (Hugging Face layout)")
    ap.add_argument("out_dir", type=Path, help="folder for the graphs, e.g. CHECKPOINT/onnx/fp16")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--opset", type=int, default=OPSET)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        export_all(args.checkpoint, args.out_dir, args.precision, args.opset)
    except LofiError as e:
        print(f"to_onnx: {e.code}: {e.message}", file=sys.stderr)
        return 1
    print(f"exported {len(G.GRAPHS)} graphs ({args.precision}) to {args.out_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make the ONNX graphs the ONNX Runtime engine runs, from the checkpoint, without PyTorch.

    python -m lofi_cuda.build CHECKPOINT OUT_DIR [--precision fp32|fp16]

One module per network (umt5, dit + lyric_encoder, dcae, vocoder) writes its graphs with the
`onnx` package from the networks' structure (lofi.acestep.configs); every weight goes from the
checkpoint's safetensors into `<graph>.onnx.data` one tensor at a time (BF16 -> the graph's
dtype as it is written), so memory stays bounded by the largest tensor, not the model. Same
graph names, inputs and outputs as lofi_cuda/graphs.py GRAPHS (the engine feeds them).
convert/torch_port is the oracle the tests check these graphs against. MusicGen's graphs are
made by the `musicgen` subpackage (`python -m lofi_cuda.build.musicgen`), in the same way.

`build_all` writes into a temporary folder beside `out_dir` and swaps it in at the end, with
`manifest.json` (opset, precision, versions, model sizes, the checkpoint files' size, mtime and
sha256) written last, so a crash never leaves a half folder that looks fresh.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from lofi.acestep.configs import DiTConfig, UMT5Config
from lofi.checkpoint import read_config
from lofi.errors import INVALID_PARAMS, LofiError

from lofi_cuda import graphs as G

PRECISIONS = ("fp32", "fp16")


def _dtype(precision: str) -> int:
    from lofi_cuda.build.graph import F16, F32
    return {"fp32": F32, "fp16": F16}[precision]


def _dims(checkpoint) -> dict:
    from lofi_cuda.build.dit import lyric_config
    from lofi_cuda.build.weights import Weights
    tc = UMT5Config.from_dict(read_config(checkpoint, "text_encoder"))
    dc = DiTConfig.from_dict(read_config(checkpoint, "transformer"))
    lc = lyric_config(Weights(checkpoint, "transformer"))
    return {"text_layers": tc.num_layers, "text_buckets": tc.relative_attention_num_buckets,
            "text_max_distance": tc.relative_attention_max_distance, "lyric_blocks": lc.blocks,
            "lyric_width": lc.width, "dit_layers": dc.num_layers, "dit_width": dc.width,
            "head_dim": dc.head_dim, "rope_theta": dc.rope_theta}


def _versions() -> dict:
    import onnx

    import lofi
    from lofi_cuda.build.graph import OPSET
    v = {"onnx": onnx.__version__, "lofi": lofi.__version__, "python": platform.python_version(),
         "builder": "lofi_cuda.build", "opset": OPSET}
    try:
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


def build_graphs(checkpoint, folder: Path, precision: str, log=print):
    """Yield (graph name, manifest entry) as each graph is written into `folder`."""
    from lofi_cuda.build import dcae, dit, umt5, vocoder
    dt = _dtype(precision)
    steps = (("text_encoder", lambda: [("text_encoder", umt5.build(checkpoint, folder, dt))]),
             ("dit", lambda: dit.build(checkpoint, folder, dt)),   # dit_encode, then dit_decode
             ("dcae_decode", lambda: [("dcae_decode", dcae.build(checkpoint, folder, dt, "decoder"))]),
             ("dcae_encode", lambda: [("dcae_encode", dcae.build(checkpoint, folder, dt, "encoder"))]),
             ("vocoder", lambda: [("vocoder", vocoder.build(checkpoint, folder, dt))]))
    for _, make in steps:
        t0 = time.perf_counter()
        for name, spec in make():
            inputs, outputs = G.GRAPHS[name]
            spec.update(inputs=list(inputs), outputs=list(outputs))
            log(f"  {name}: {spec['weight_bytes'] / 1e6:.1f} MB of weights, {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            yield name, spec


def build_all(checkpoint: str | Path, out_dir: str | Path, precision: str = "fp32", log=print,
              on_graph=None) -> dict:
    """Build every graph into `out_dir` (replacing what is there) and write its manifest."""
    if precision not in PRECISIONS:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    described = G.describe_checkpoint(checkpoint)   # hashes first: fails early on a bad checkpoint
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        specs = {}
        for name, spec in build_graphs(checkpoint, work, precision, log):
            specs[name] = spec
            if on_graph is not None:
                on_graph(name, len(specs), len(G.GRAPHS))
        from lofi_cuda.build.graph import OPSET
        manifest = {"format": G.FORMAT, "precision": precision, "opset": OPSET,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
                    "dims": _dims(checkpoint), "graphs": specs, "checkpoint": described}
        tmp = work / (G.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(work / G.MANIFEST)
        work.chmod(0o755)  # mkdtemp makes it private; the graphs are not secret
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest

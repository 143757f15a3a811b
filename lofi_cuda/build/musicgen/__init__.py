"""Make MusicGen's ONNX graphs from a transformers-layout checkpoint, without PyTorch.

    python -m lofi_cuda.build.musicgen CHECKPOINT OUT_DIR [--precision fp32|fp16]

The graphs of lofi_cuda/musicgen/graphs.py GRAPHS: the T5 text encoder + projection, the
decoder's cross-attention keys/values, the KV-cached decoder step (a CPU and a GPU form over one
weight file), the EnCodec decoder. Like
lofi_cuda.build: written into a temporary folder swapped in at the end, manifest last.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from lofi.errors import INVALID_PARAMS, LofiError
from lofi.musicgen.configs import load_config

from lofi_cuda.build import PRECISIONS, _dtype, _versions
from lofi_cuda.musicgen import graphs as MG


def build_graphs(checkpoint, folder: Path, precision: str, log=print):
    from lofi_cuda.build.musicgen import decoder, encodec, t5
    cfg = load_config(checkpoint)
    dt = _dtype(precision)
    for make in (t5.build, decoder.build_cross, decoder.build_step, encodec.build):
        t0 = time.perf_counter()
        out = make(checkpoint, folder, dt, cfg)
        for name, spec in out:
            log(f"  {name}: {spec['weight_bytes'] / 1e6:.1f} MB of weights, {time.perf_counter() - t0:.1f} s")
            yield name, spec


def dims(checkpoint) -> dict:
    cfg = load_config(checkpoint)
    t, d = cfg.text, cfg.decoder
    return {"text_buckets": t.relative_attention_num_buckets,
            "text_max_distance": t.relative_attention_max_distance,
            "layers": d.num_hidden_layers, "heads": d.num_attention_heads,
            "head_dim": d.hidden_size // d.num_attention_heads, "hidden": d.hidden_size,
            "codebooks": d.num_codebooks, "max_positions": d.max_position_embeddings}


def build_all(checkpoint, out_dir, precision: str = "fp32", log=print) -> dict:
    if precision not in PRECISIONS:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    described = MG.describe_checkpoint(checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        specs = dict(build_graphs(checkpoint, work, precision, log))
        from lofi_cuda.build.graph import OPSET
        manifest = {"family": MG.FAMILY, "format": MG.FORMAT, "precision": precision, "opset": OPSET,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
                    "dims": dims(checkpoint), "graphs": specs, "checkpoint": described}
        tmp = work / (MG.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(work / MG.MANIFEST)
        work.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest

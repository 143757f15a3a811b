"""int8 DiT weights for ONNX Runtime on the CPU (`--quantize 8`, LOFI_QUANTIZE=8).

`dit_decode.q8.onnx` is made from the builder's fp32 `dit_decode.onnx` (lofi_cuda/build) beside
it in the form ONNX Runtime's dynamic quantization writes, made here one weight at a time (see
`_rewrite`): the transformer blocks' MatMuls whose weight is a
constant (q/k/v/out of the self-attention, the feed-forward's two projections) get int8 weights,
per output channel, and run as MatMulInteger on activations quantized per call (uint8).
Cross-attention, attention products, norms, the embedders and the final layer stay fp32.
`dit_decode.q8.json` records the source graph's size and mtime and the onnxruntime version; a
mismatch makes it again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path

from lofi.errors import MODEL_LOAD_FAILED, LofiError

SUFFIX = ".q8"


def _sources(folder: Path, graph: str) -> dict:
    out = {}
    for f in (folder / f"{graph}.onnx", folder / f"{graph}.onnx.data"):
        if f.is_file():
            st = f.stat()
            out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def quantized_path(folder: Path, graph: str = "dit_decode") -> Path:
    return folder / f"{graph}{SUFFIX}.onnx"


def fresh(folder: Path, graph: str = "dit_decode") -> bool:
    import onnxruntime
    try:
        rec = json.loads((folder / f"{graph}{SUFFIX}.json").read_text())
    except (OSError, ValueError):
        return False
    return (quantized_path(folder, graph).is_file() and rec.get("sources") == _sources(folder, graph)
            and rec.get("onnxruntime") == onnxruntime.__version__)


def block_matmuls(model) -> list[str]:
    """Names of the transformer blocks' MatMul nodes whose second input is a weight (the builder
    names each weight by its checkpoint key), cross-attention left out: its per-call uint8
    activations (the [cond; null] batch in one range) took the golden fixture's latents error
    from 2.4e-2 to 8.2e-2."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and n.input[1] in inits and n.input[1].startswith("transformer_blocks.")
            and ".cross_attn." not in n.input[1]]


def _named(model) -> None:
    """The builder leaves nodes unnamed; quantize_dynamic selects nodes by name."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def ensure_quantized(folder: str | Path, graph: str = "dit_decode", log=print) -> Path:
    """The int8 graph, made first if missing or stale (needs the `onnx` package)."""
    folder = Path(folder)
    out = quantized_path(folder, graph)
    if fresh(folder, graph):
        return out
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise LofiError(MODEL_LOAD_FAILED, f"making the int8 DiT graph needs the onnx package "
                        f"(it comes with 'lofi[onnx-cpu]'): {e}") from e
    src = folder / f"{graph}.onnx"
    model = onnx.load(str(src), load_external_data=False)
    _named(model)
    nodes = block_matmuls(model)
    if not nodes:
        raise LofiError(MODEL_LOAD_FAILED, f"{src}: no transformer-block MatMul with constant weights to quantize")
    log(f"lofi: quantizing {len(nodes)} DiT MatMuls of {src} to int8 (one-time)")
    data = out.with_name(out.name + ".data")
    tmp = folder / f".{graph}{SUFFIX}.{os.getpid()}.tmp.onnx"
    tmp_data = tmp.with_name(tmp.name + ".data")
    try:
        external = (folder / f"{graph}.onnx.data").is_file()
        # "x": a fresh file, never through a link planted at the temporary's name
        with open(tmp_data, "xb") if external else contextlib.nullcontext() as fh:
            _rewrite(model, set(nodes), folder, fh, data.name)
        onnx.save(model, str(tmp))
        if external:
            os.chmod(tmp_data, src.stat().st_mode & 0o777)  # written as a private temporary
            os.replace(tmp_data, data)
        os.replace(tmp, out)
    except LofiError:
        raise
    except Exception as e:
        raise LofiError(MODEL_LOAD_FAILED, f"quantizing {src} failed: {type(e).__name__}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
    rec = {"sources": _sources(folder, graph), "onnxruntime": onnxruntime.__version__, "nodes": len(nodes),
           "weight_type": "int8 per channel", "activations": "uint8 per call (dynamic)"}
    tmp_rec = folder / f".{graph}{SUFFIX}.{os.getpid()}.json"
    tmp_rec.write_text(json.dumps(rec, indent=1))
    os.replace(tmp_rec, folder / f"{graph}{SUFFIX}.json")
    return out


def _rewrite(model, targets: set, folder: Path, fh, data_name: str) -> None:
    """Replace each target MatMul(x, W) in place by the dynamic int8 form ONNX Runtime's
    `quantize_dynamic` writes (and fuses to one kernel): x -> DynamicQuantizeLinear (uint8, one
    per input tensor), W -> int8 per output column, symmetric (scale max|W[:, n]| / 127), then
    MatMulInteger, Cast and the scales' product. One weight is read at a time, so memory stays
    at one tensor whatever the model's size (quantize_dynamic loads the whole model and was
    killed at 22.8 GB on the full-size DiT). Int8 weights go to `fh` as external data under
    `data_name` (inline when fh is None); the other weights keep their place in the source's
    data file, which the int8 graph shares."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    used = Counter(i for n in g.node for i in n.input)
    drop, added, nodes, dq = set(), [], [], {}
    for n in g.node:
        if n.name not in targets:
            nodes.append(n)
            continue
        x, wname = n.input
        w = numpy_helper.to_array(inits[wname], base_dir=str(folder)).astype(np.float32)
        if w.ndim != 2:
            raise ValueError(f"{n.name}: a 2-D weight expected, got {list(w.shape)}")
        scale = np.abs(w).max(axis=0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        wq = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        del w
        qw = numpy_helper.from_array(wq, wname + "_q8")
        if fh is not None:
            pad = -fh.tell() % 64
            fh.write(b"\0" * pad)
            offset = fh.tell()
            fh.write(qw.raw_data)
            qw.ClearField("raw_data")
            qw.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(wq.nbytes))):
                qw.external_data.add(key=k, value=v)
        added += [qw, numpy_helper.from_array(scale, wname + "_q8_scale"),
                  numpy_helper.from_array(np.zeros(scale.shape, np.int8), wname + "_q8_zero")]
        if used[wname] == 1:
            drop.add(wname)
        if x not in dq:
            dq[x] = (x + "_u8", x + "_u8_scale", x + "_u8_zero")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(dq[x]), name=x + "_dql"))
        xq, xs, xz = dq[x]
        y = n.output[0]
        nodes += [
            helper.make_node("MatMulInteger", [xq, wname + "_q8", xz, wname + "_q8_zero"], [y + "_i32"],
                             name=n.name + "_int"),
            helper.make_node("Cast", [y + "_i32"], [y + "_f"], to=TensorProto.FLOAT, name=n.name + "_cast"),
            helper.make_node("Mul", [xs, wname + "_q8_scale"], [y + "_scale"], name=n.name + "_scale"),
            helper.make_node("Mul", [y + "_f", y + "_scale"], [y], name=n.name + "_out"),
        ]
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + added)
    del g.node[:]
    g.node.extend(nodes)

"""Where MusicGen's ONNX graphs live and whether they still match the checkpoint (no ML framework
imported). Same places and freshness rules as the ACE-Step graphs (lofi_cuda/graphs.py): next to
a checkpoint under LOFI_HOME, else under LOFI_HOME's `onnx/`; a manifest written last records the
checkpoint files' size, mtime and sha256."""

from __future__ import annotations

from pathlib import Path

from lofi.checkpoint import weight_files

from lofi_cuda import graphs as _graphs
from lofi_cuda.graphs import MANIFEST, read_manifest, sha256

FAMILY = "musicgen"
FORMAT = 2  # 2: a CPU step graph over a cache buffer + the concatenating one for CUDA
# graph name -> (input names, output names); per-layer cache names are added by the layer count
GRAPHS = {
    "mg_text_encoder": (("input_ids", "attention_mask", "buckets"), ("last_hidden_state", "states")),
    "mg_cross_kv": (("enc_states",), ("cross.N.key", "cross.N.value")),
    "mg_decoder": (("ids", "pos", "self_bias", "cross_bias", "cache.N.key", "cache.N.value",
                    "cross.N.key", "cross.N.value"), ("logits", "new.N.key", "new.N.value")),
    "mg_decoder_cat": (("ids", "pos", "self_bias", "cross_bias", "past.N.key", "past.N.value",
                        "cross.N.key", "cross.N.value"), ("logits", "present.N.key", "present.N.value")),
    "mg_encodec_decode": (("codes",), ("audio", "embeddings", "tap.N")),
}


def checkpoint_files(checkpoint: str | Path) -> list[Path]:
    root = Path(checkpoint)
    return [root / "config.json", *weight_files(root)]


def describe_checkpoint(checkpoint: str | Path) -> dict:
    root = Path(checkpoint)
    out = {}
    for f in checkpoint_files(root):
        st = f.stat()
        out[f.relative_to(root).as_posix()] = {"sha256": sha256(f), "size": st.st_size,
                                               "mtime_ns": st.st_mtime_ns}
    return out


def stale_reason(folder: Path, checkpoint: str | Path, precision: str) -> str | None:
    m = read_manifest(folder)
    if m is None:
        return f"no readable {MANIFEST} in {folder}"
    if m.get("family") != FAMILY or m.get("format") != FORMAT or m.get("precision") != precision:
        return (f"{folder} holds {m.get('family', 'ace-step')} format {m.get('format')} / "
                f"{m.get('precision')} graphs")
    graphs = m.get("graphs", {})
    if set(graphs) != set(GRAPHS):
        return f"{folder} lacks graphs {sorted(set(GRAPHS) - set(graphs))}"
    for spec in graphs.values():
        if not (folder / spec["file"]).is_file():
            return f"graph file {folder / spec['file']} is missing"
    root = Path(checkpoint)
    recorded = m.get("checkpoint", {})
    if {f.relative_to(root).as_posix() for f in checkpoint_files(root)} != set(recorded):
        return "the checkpoint's files differ from those the graphs were made from"
    for rel, info in recorded.items():
        st = (root / rel).stat()
        if st.st_size != info["size"] or (st.st_mtime_ns != info["mtime_ns"]
                                          and sha256(root / rel) != info["sha256"]):
            return f"{rel} changed since the graphs were built"
    return None


def locate(checkpoint: str | Path, precision: str) -> tuple[Path | None, list[str]]:
    return _graphs.locate(checkpoint, precision, stale=stale_reason)

"""Where the ONNX graphs live, what they are, and whether they still match the checkpoint.

A graph folder holds one `.onnx` file per graph (plus `.onnx.data` for graphs over 2 GB) and a
`manifest.json` written last by the builder (lofi_cuda/build). The manifest records the
opset, precision, tool versions, the model sizes the engine needs, and the size, mtime and
sha256 of every checkpoint file the graphs were made from. Graphs are "fresh" when the
manifest's format and precision match and every checkpoint file is unchanged (same size and
mtime, or else the same sha256). No ML framework is imported here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lofi.checkpoint import COMPONENTS, component_dir, weight_files

FORMAT = 3  # 2: dit graphs carry a weight map (LoRA); 3: the DCAE decoder runs in windows
MANIFEST = "manifest.json"

# graph name -> (ordered input names, output names). The engine and the exporter share these.
GRAPHS = {
    "text_encoder": (("input_ids", "attention_mask", "buckets", "q_scale"), ("last_hidden_state",)),
    "dit_encode": (("text_hidden", "text_mask", "lyric_ids", "lyric_mask", "pe", "rel_index", "lyric_q_scale"),
                   ("ctx", "ctx_mask")),
    "dit_decode": (("x", "timestep", "ctx", "ctx_mask", "q_scale", "cos", "sin", "cos_ctx", "sin_ctx"),
                   ("velocity",)),
    "dcae_decode": (("latents", "sum_windows", "attn_windows", "up_windows"), ("mel",)),
    "dcae_encode": (("mel",), ("latents",)),
    "vocoder": (("mel",), ("wave",)),
}
# the checkpoint component each graph is made from
SOURCES = {"text_encoder": "text_encoder", "dit_encode": "transformer", "dit_decode": "transformer",
           "dcae_decode": "dcae", "dcae_encode": "dcae", "vocoder": "vocoder"}


def checkpoint_files(checkpoint: str | Path) -> list[Path]:
    """config.json and the weight files of every component (what the graphs depend on)."""
    files = []
    for comp in COMPONENTS:
        folder = component_dir(checkpoint, comp)
        files.append(folder / "config.json")
        files.extend(weight_files(folder))
    return files


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_checkpoint(checkpoint: str | Path) -> dict:
    root = Path(checkpoint)
    out = {}
    for f in checkpoint_files(root):
        st = f.stat()
        out[f.relative_to(root).as_posix()] = {"sha256": sha256(f), "size": st.st_size,
                                               "mtime_ns": st.st_mtime_ns}
    return out


def read_manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def stale_reason(folder: Path, checkpoint: str | Path, precision: str) -> str | None:
    """None if `folder` holds fresh graphs for this checkpoint and precision, else why not."""
    m = read_manifest(folder)
    if m is None:
        return f"no readable {MANIFEST} in {folder}"
    if m.get("format") != FORMAT or m.get("precision") != precision:
        return f"{folder} holds format {m.get('format')} / {m.get('precision')} graphs"
    for name, spec in m.get("graphs", {}).items():
        if not (folder / spec["file"]).is_file():
            return f"graph file {folder / spec['file']} is missing"
    if set(m.get("graphs", {})) != set(GRAPHS):
        return f"{folder} lacks graphs {sorted(set(GRAPHS) - set(m.get('graphs', {})))}"
    root = Path(checkpoint)
    recorded = m.get("checkpoint", {})
    current = {f.relative_to(root).as_posix() for f in checkpoint_files(root)}
    if current != set(recorded):
        return "the checkpoint's files differ from those the graphs were made from"
    for rel, info in recorded.items():
        f = root / rel
        st = f.stat()
        if st.st_size != info["size"]:
            return f"{rel} changed since the graphs were exported"
        if st.st_mtime_ns != info["mtime_ns"] and sha256(f) != info["sha256"]:
            return f"{rel} changed since the graphs were exported"
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def graph_dir(checkpoint: str | Path, precision: str) -> Path:
    """Where graphs for this checkpoint are built: next to it (`<checkpoint>/onnx/<precision>`)
    when it lies under LOFI_HOME (what `lofi setup` installs), else in LOFI_HOME's own `onnx/`
    folder keyed by the checkpoint's path: lofi never writes into a folder it does not own."""
    from lofi.hub.files import lofi_home
    home, ck = lofi_home(), Path(checkpoint)
    if _inside(ck, home):
        return ck / "onnx" / precision
    key = hashlib.sha256(str(ck.resolve()).encode()).hexdigest()[:16]
    return home / "onnx" / key / precision


def locate(checkpoint: str | Path, precision: str, stale=None) -> tuple[Path | None, list[str]]:
    """(folder with fresh graphs or None, reasons the candidates were rejected). `stale` is the
    family's freshness check (default: ACE-Step's stale_reason)."""
    stale = stale or stale_reason
    reasons = []
    candidates = [Path(checkpoint) / "onnx" / precision]
    if graph_dir(checkpoint, precision) != candidates[0]:
        candidates.append(graph_dir(checkpoint, precision))
    for folder in candidates:
        why = stale(folder, checkpoint, precision) if folder.is_dir() else f"{folder} does not exist"
        if why is None:
            return folder, reasons
        reasons.append(why)
    return None, reasons

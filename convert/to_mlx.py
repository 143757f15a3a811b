"""Hugging Face ACE-Step checkpoint -> MLX-native safetensors, one file per network.

Each network is built by its own module's `load(checkpoint_root, precision)` (which runs its
`sanitize` and a strict load), and what is saved is exactly the parameters the engine would hold:
sanitized names, MLX layouts, weight norm folded, in the run dtype with the modules' fp32 islands
(e.g. UMT5's `wo`) kept fp32. Loading them back skips sanitizing, casting and folding.

    <checkpoint>/mlx/<component>.safetensors   text_encoder, transformer, dcae, vocoder
    <checkpoint>/mlx/manifest.json             precision, source revision, and per component the
                                               source files' sizes and hashes, the converter's
                                               fingerprint and the output's size and sha256

A conversion is stale when a source file's hash, the precision or the converting code differs
from what the manifest recorded; stale or absent conversions are never returned, and setup
converts them again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from lofi.checkpoint import COMPONENTS, read_config, weight_files

FORMAT = 1
PRECISIONS = ("fp16", "bf16", "fp32")
# The modules whose code decides what a component's converted weights are.
_MODULES = {
    "text_encoder": ("umt5",),
    "transformer": ("dit", "lyric_encoder"),
    "dcae": ("dcae",),
    "vocoder": ("vocoder",),
}


def resolve_root(home_or_ckpt: str | Path) -> Path:
    """Accept $LOFI_HOME or the checkpoint folder itself ($LOFI_HOME/ace-step)."""
    p = Path(home_or_ckpt)
    if not any((p / d).exists() for d in COMPONENTS.values()) and not (p / "mlx").exists() \
            and (p / "ace-step").is_dir():
        return p / "ace-step"
    return p


def mlx_dir(root: str | Path) -> Path:
    return Path(root) / "mlx"


def read_manifest(root: str | Path) -> dict | None:
    try:
        m = json.loads((mlx_dir(root) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("components"), dict):
        return None
    return m


def _write_manifest(root: Path, manifest: dict) -> None:
    path = mlx_dir(root) / "manifest.json"
    tmp = path.with_name(f".manifest.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


_FINGERPRINTED = {"sanitize", "load", "from_weights", "load_strict", "fold_weight_norm", "drop_keys"}


def _defs_source(path: Path) -> str:
    """Source of the functions in _FINGERPRINTED defined in a file, at top level or in a class.
    Read from the file, so what counts is the code on disk, whatever is patched at run time."""
    import ast
    text = path.read_text()
    out = []
    for node in ast.parse(text).body:
        nodes = node.body if isinstance(node, ast.ClassDef) else [node]
        for n in nodes:
            if isinstance(n, ast.FunctionDef) and n.name in _FINGERPRINTED:
                out.append(ast.get_source_segment(text, n) or "")
    return "\n".join(out)


def code_fingerprint(component: str) -> str:
    """sha256 over the code that decides this component's converted weights: each module's
    `sanitize`, `load` and `from_weights` (also as class methods) and the shared loading helpers.
    Comments and code elsewhere in the modules do not count."""
    import importlib.util
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for name in ("common",) + _MODULES[component]:
        spec = importlib.util.find_spec(f"lofi_mlx.acestep.{name}")
        h.update(_defs_source(Path(spec.origin)).encode())
    return h.hexdigest()


def source_files(root: Path, component: str) -> list[str]:
    """config.json and the weight files of one component, relative to the checkpoint root."""
    folder = root / COMPONENTS[component]
    files = [folder / "config.json"] + list(folder.glob("*.safetensors.index.json")) + weight_files(folder)
    return sorted(str(f.relative_to(root)) for f in files)


def _source_record(root: Path, rel: str) -> dict:
    """Size, mtime and hashes of a source file; taken from setup's record when still valid."""
    from lofi.hub.files import file_unchanged, hash_file, load_state
    path = root / rel
    rec = ((load_state(root) or {}).get("files") or {}).get(rel)
    if rec and file_unchanged(path, rec):
        return {k: rec[k] for k in ("size", "mtime_ns", "sha256", "git_sha1")}
    sha256, git_sha1 = hash_file(path)
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "git_sha1": git_sha1}


def _output_bytes(root: Path, component: str, precision: str) -> int:
    """Upper bound of a converted file's size: every source value at 4 bytes (fp32) or 2."""
    from lofi.checkpoint import open_safetensors
    def per(name: str) -> int:  # UMT5's wo is an fp32 island at every precision
        return 4 if precision == "fp32" or name.endswith("wo.weight") else 2
    return sum(v.size * per(k) for f in weight_files(root / COMPONENTS[component])
               for k, v in open_safetensors(f).items())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- converting --------------------------------------------------------------------------------

def build(root: str | Path, component: str, precision: str):
    """The network as the engine would load it from the original files."""
    from lofi_mlx.acestep import dcae
    from lofi_mlx.acestep import dit
    from lofi_mlx.acestep import umt5
    from lofi_mlx.acestep import vocoder
    loaders = {"text_encoder": umt5.load, "transformer": dit.load, "dcae": dcae.load,
               "vocoder": vocoder.load}
    return loaders[component](root, precision)


def convert_component(root: str | Path, component: str, precision: str = "fp16",
                      quantize: int | None = None) -> dict:
    """{parameter name: mx.array} of one network, sanitized and cast as the engine holds it
    (the whole network in memory: for tests; conversion streams with `write_component`); the
    DiT's block linears quantized to `quantize` bits when asked (lofi_mlx/quantize.py)."""
    from mlx.utils import tree_flatten
    model = build(root, component, precision)
    if quantize and component == "transformer":
        from lofi_mlx.quantize import quantize_dit
        quantize_dit(model, quantize)
    return dict(tree_flatten(model.parameters()))


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}


class SafetensorsSink:
    """Receives a network's parameters one at a time (`common.params_to`) and writes them to a
    safetensors file as they come: the header first (names, shapes and dtypes are known before
    any value), then each tensor's bytes, in the order announced. mx.load reads the result."""

    def __init__(self, path: Path, metadata: dict):
        self.path, self.metadata, self.fh, self.order, self.nbytes = path, metadata, None, [], 0

    def begin(self, entries, model=None) -> None:
        import numpy as np
        if self.fh is not None:
            raise RuntimeError("one network per file")
        header, offset = {"__metadata__": {k: str(v) for k, v in self.metadata.items()}}, 0
        for name, shape, dtype in entries:
            kind = _ST_DTYPES[str(dtype).rsplit(".", 1)[-1]]
            n = int(np.prod(shape)) * (4 if kind in ("F32", "U32") else 2)
            header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            self.order.append((name, n))
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.fh = open(self.path, "wb")
        self.fh.write(len(head).to_bytes(8, "little") + head)
        self.nbytes = offset
        self._next = 0

    def write(self, name: str, array) -> None:
        import numpy as np
        from lofi_mlx.mlxrt import mx
        want, n = self.order[self._next]
        if name != want:
            raise RuntimeError(f"parameter {name} out of order (expected {want})")
        a = np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        data = np.ascontiguousarray(a).tobytes()
        if len(data) != n:
            raise RuntimeError(f"{name}: {len(data)} bytes, the header says {n}")
        self.fh.write(data)
        self._next += 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            if self._next != len(self.order):
                raise RuntimeError(f"{self.path}: {self._next} of {len(self.order)} tensors written")


class QuantizingSink:
    """Quantizes the DiT's block linears on their way to `sink` (lofi_mlx/quantize.py), one
    weight at a time, so a quantized conversion streams like a plain one."""

    def __init__(self, sink, bits: int, group_size: int):
        self.sink, self.bits, self.group_size, self.names = sink, bits, group_size, set()

    def begin(self, entries, model=None) -> None:
        from lofi_mlx.mlxrt import mx
        from lofi_mlx.quantize import eligible_weights
        self.names = eligible_weights(model, self.group_size)
        out = []
        for name, shape, dtype in entries:
            if name not in self.names:
                out.append((name, shape, dtype))
                continue
            rows, cols = shape
            base, groups = name[:-len(".weight")], (rows, cols // self.group_size)
            out += [(name, (rows, cols * self.bits // 32), mx.uint32),
                    (f"{base}.scales", groups, dtype), (f"{base}.biases", groups, dtype)]
        self.sink.begin(out)

    def write(self, name: str, array) -> None:
        if name not in self.names:
            return self.sink.write(name, array)
        from lofi_mlx.mlxrt import mx
        q, scales, biases = mx.quantize(array, self.group_size, self.bits)
        mx.eval(q, scales, biases)
        base = name[:-len(".weight")]
        self.sink.write(name, q)
        self.sink.write(f"{base}.scales", scales)
        self.sink.write(f"{base}.biases", biases)

    def close(self) -> None:
        self.sink.close()


def write_component(root: str | Path, component: str, precision: str, path: Path,
                    metadata: dict, quantize: dict | None = None) -> None:
    """Convert one network straight to `path`, tensor by tensor: the module's own `load` runs
    (same sanitize, casts and fp32 islands), but each parameter goes to disk, not into a model.
    quantize: {"bits", "group_size"} of the DiT's block linears (None: as they are)."""
    from lofi_mlx.acestep.common import params_to
    sink = SafetensorsSink(path, metadata)
    if quantize and component == "transformer":
        sink = QuantizingSink(sink, quantize["bits"], quantize["group_size"])
    try:
        with params_to(sink):
            build(root, component, precision)
    finally:
        sink.close()


def convert_checkpoint(root: str | Path, precision: str = "fp16", components: list[str] | None = None,
                       on_progress: Callable[[str, float], None] | None = None,
                       check_free: Callable[[int], None] | None = None,
                       quantize: int | None = None) -> dict:
    """Convert `components` (default: the stale ones) and rewrite the manifest; returns it.
    `quantize` (8 or 4): the DiT is stored with quantized block weights, recorded in the manifest.

    Each output is written to a temporary name and renamed into place, and the manifest names a
    component only once its file is complete, so an interrupted conversion leaves no file that
    would be taken for a fresh one."""
    from lofi.errors import INVALID_PARAMS, LofiError
    from lofi_mlx.mlxrt import mx
    from lofi.hub.files import load_state

    if precision not in PRECISIONS:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {PRECISIONS}, got {precision!r}")
    root = Path(root)
    out_dir = mlx_dir(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    qrec = None
    if quantize:
        from lofi_mlx.quantize import GROUP_SIZE, check_bits
        qrec = {"bits": check_bits(quantize), "group_size": GROUP_SIZE}
    if components is None:
        components = [c for c in COMPONENTS if not component_fresh(root, c, precision)
                      or (c == "transformer" and converted_quantization(root, c) != qrec)]
    manifest = read_manifest(root)
    if manifest is None or manifest.get("precision") != precision:
        manifest = {"format": FORMAT, "precision": precision, "components": {}}
    state = load_state(root) or {}
    manifest["repo"] = state.get("repo")
    manifest["revision"] = state.get("revision")

    for comp in components:
        if on_progress:
            on_progress(comp, 0.0)
        sources = {rel: _source_record(root, rel) for rel in source_files(root, comp)}
        manifest["components"].pop(comp, None)
        _write_manifest(root, manifest)
        if check_free:  # the output is at most the source widened to the run dtype
            check_free(_output_bytes(root, comp, precision))
        dest = out_dir / f"{comp}.safetensors"
        tmp = out_dir / f".{comp}.{os.getpid()}.tmp.safetensors"
        try:
            write_component(root, comp, precision, tmp, metadata={
                "format": "mlx", "component": comp, "precision": precision,
                "revision": str(manifest.get("revision") or "")}, quantize=qrec)
            gc.collect()
            mx.clear_cache()
            if on_progress:
                on_progress(comp, 0.9)
            digest = _sha256(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        manifest["components"][comp] = {
            "file": dest.name, "size": dest.stat().st_size, "sha256": digest,
            "code": code_fingerprint(comp), "sources": sources, "revision": manifest.get("revision"),
            "created": time.time()}
        if qrec and comp == "transformer":
            manifest["components"][comp]["quantize"] = qrec
        _write_manifest(root, manifest)
        if on_progress:
            on_progress(comp, 1.0)
    _write_manifest(root, manifest)
    return manifest


# -- freshness ---------------------------------------------------------------------------------

def _entry(root: Path, component: str, precision: str | None) -> dict | None:
    m = read_manifest(root)
    if m is None or (precision is not None and m.get("precision") != precision):
        return None
    e = m["components"].get(component)
    if not isinstance(e, dict) or not isinstance(e.get("sources"), dict):
        return None
    if e.get("code") != code_fingerprint(component):
        return None
    try:
        if (mlx_dir(root) / e["file"]).stat().st_size != e["size"]:
            return None
    except (OSError, KeyError, TypeError):
        return None
    return e


def component_fresh(root: str | Path, component: str, precision: str | None = None) -> bool:
    """True if the converted file matches the local source files (cheap unless a source changed)."""
    from lofi.hub.files import file_unchanged, hash_file, load_state
    root = Path(root)
    e = _entry(root, component, precision)
    if e is None:
        return False
    state = load_state(root) or {}
    removed = set(state.get("removed", []))
    records = state.get("files") or {}
    folder = COMPONENTS[component] + "/"
    # the set of source files must be the same (a new shard, or one gone, changes the network)
    current = {rel for rel in records if rel.startswith(folder) and (rel.endswith(".safetensors")
               or rel.endswith("/config.json") or rel.endswith(".safetensors.index.json"))}
    if records and current and current != set(e["sources"]):
        return False
    for rel, src in e["sources"].items():
        path = root / rel
        rec = records.get(rel)
        if not path.exists():
            if not (rel in removed and rec and rec.get("sha256") == src.get("sha256")):
                return False
            continue
        if rec and file_unchanged(path, rec):
            if rec.get("sha256") != src.get("sha256"):
                return False
        elif not file_unchanged(path, src):
            if hash_file(path)[0] != src.get("sha256"):
                return False
    return True


def conversion_fresh(root: str | Path, precision: str | None = None) -> bool:
    return all(component_fresh(root, c, precision) for c in COMPONENTS)


def stale_components(root: str | Path, remote, precision: str) -> list[str]:
    """Components whose conversion does not match the files of `remote` (a setup.Remote)."""
    root = Path(root)
    out = []
    for comp in COMPONENTS:
        e = _entry(root, comp, precision)
        folder = COMPONENTS[comp] + "/"
        wanted = {f.path: f for f in remote.files if f.path.startswith(folder)
                  and (f.path.endswith(".safetensors") or f.path.endswith("/config.json")
                       or f.path.endswith(".safetensors.index.json"))}
        if e is None or set(e["sources"]) != set(wanted):
            out.append(comp)
            continue
        for rel, rf in wanted.items():
            src = e["sources"][rel]
            same = (src.get("sha256") == rf.sha256) if rf.sha256 else (src.get("git_sha1") == rf.blob_id)
            if not same or src.get("size") != rf.size:
                out.append(comp)
                break
    return out


# -- loading -----------------------------------------------------------------------------------

def converted_weights(home_or_ckpt: str | Path, component: str, precision: str | None = None
                      ) -> dict | None:
    """The converted {parameter name: mx.array} of one network, or None when there is no fresh
    conversion (absent, stale, or made at another precision than `precision`)."""
    from lofi_mlx.mlxrt import mx
    root = resolve_root(home_or_ckpt)
    if component not in COMPONENTS or not component_fresh(root, component, precision):
        return None
    e = read_manifest(root)["components"][component]
    return mx.load(str(mlx_dir(root) / e["file"]))


def converted_quantization(home_or_ckpt: str | Path, component: str) -> dict | None:
    """{"bits", "group_size"} of a converted component's quantized layers, or None."""
    m = read_manifest(resolve_root(home_or_ckpt))
    e = (m or {}).get("components", {}).get(component)
    return e.get("quantize") if isinstance(e, dict) else None


def converted_precision(home_or_ckpt: str | Path) -> str | None:
    m = read_manifest(resolve_root(home_or_ckpt))
    return m.get("precision") if m else None


def load_converted(home_or_ckpt: str | Path, component: str, precision: str | None = None,
                   parts: tuple | None = None):
    """The network built from its converted weights (None if there is no fresh conversion).
    Gives the same parameters, bit for bit, as the module's own `load` at that precision.
    `parts` selects DCAE parts, as in dcae.load."""
    from lofi.errors import MODEL_LOAD_FAILED, LofiError
    from lofi_mlx.mlxrt import mx
    root = resolve_root(home_or_ckpt)
    weights = converted_weights(root, component, precision)
    if weights is None:
        return None
    cfg = read_config(root, component)
    if component == "text_encoder":
        from lofi_mlx.acestep import umt5
        model = umt5.UMT5Encoder(umt5.UMT5Config.from_dict(cfg))
    elif component == "transformer":
        from lofi_mlx.acestep import dit
        from lofi_mlx.acestep import lyric_encoder
        model = dit.ACEStepDiT(dit.DiTConfig.from_dict(cfg),
                               lyric_encoder.LyricEncoderConfig.from_weights(weights))
    elif component == "dcae":
        from lofi_mlx.acestep import dcae
        parts = tuple(parts or dcae.PARTS)
        model = dcae.MusicDCAE(dcae.DCAEConfig.from_dict(cfg), parts)
        weights = {k: v for k, v in weights.items() if k.split(".")[0] in parts
                   or k.split(".")[0] not in dcae.PARTS}
    else:
        from lofi_mlx.acestep import vocoder
        model = vocoder.Vocoder(vocoder.VocoderConfig.from_dict(cfg))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise LofiError(MODEL_LOAD_FAILED, f"{mlx_dir(root)}/{component}.safetensors does not fit the "
                        f"network ({e}); run `lofi setup ace-step` to convert again") from e
    model.eval()
    mx.eval(model.parameters())
    return model

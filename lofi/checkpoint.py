"""The Hugging Face layout of ACE-Step/ACE-Step-v1-3.5B: folders, config.json, safetensors.

Engine-agnostic, so the MLX engine, the ONNX exporter and the converter share one reader with
one set of error messages. `load_component` streams: it returns `LazyTensor`s that read their
bytes from the file only when converted (`np.asarray`), so a loader that converts and releases
one tensor at a time never holds more than that tensor besides what it builds. BF16 comes back
as `ml_dtypes.bfloat16` (exact, no widening) unless `widen=True` asks for float32.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import numpy as np

from lofi.errors import MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError

COMPONENTS = {
    "transformer": "ace_step_transformer",
    "text_encoder": "umt5-base",
    "dcae": "music_dcae_f8c8",
    "vocoder": "music_vocoder",
}

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,  # see _dtype
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


@functools.cache
def _bf16():
    """numpy's bfloat16 (ml_dtypes), imported on first use: its import costs seconds, which a
    daemon answering its first request must not pay."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _dtype(name: str) -> np.dtype:
    return _bf16() if name == "BF16" else np.dtype(_DTYPES[name])


def component_dir(root: str | Path, component: str) -> Path:
    folder = Path(root) / COMPONENTS[component]
    if not folder.is_dir():
        raise LofiError(MODEL_NOT_FOUND, f"checkpoint folder missing: {folder} "
                        f"(expected the layout of ACE-Step/ACE-Step-v1-3.5B; run `lofi setup ace-step`)")
    return folder


def check_checkpoint(root: str | Path) -> Path:
    """Cheap up-front check: every folder, config and weight file is there and parses."""
    root = Path(root)
    if not root.is_dir():
        raise LofiError(MODEL_NOT_FOUND, f"checkpoint not found: {root} (run `lofi setup ace-step`)")
    for comp in COMPONENTS:
        read_config(root, comp)
        for f in weight_files(component_dir(root, comp)):
            read_header(f)
    return root


def read_config(root: str | Path, component: str) -> dict:
    path = component_dir(root, component) / "config.json"
    if not path.is_file():
        raise LofiError(MODEL_NOT_FOUND, f"missing {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LofiError(MODEL_LOAD_FAILED, f"malformed {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise LofiError(MODEL_LOAD_FAILED, f"malformed {path}: not a JSON object")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The safetensors of one component, following a sharded index when there is one."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"malformed {index}: {e}") from e
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise LofiError(MODEL_NOT_FOUND, f"missing shard {f} listed in {index}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LofiError(MODEL_NOT_FOUND, f"no .safetensors weights in {folder}")
    return files


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (header, data offset)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise LofiError(MODEL_LOAD_FAILED, f"damaged weight file {path}: {e}") from e
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"unsupported dtype {info['dtype']}")
        except (KeyError, TypeError, ValueError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"damaged weight file {path}: tensor {name}: {e}") from e
        if not 0 <= start <= end <= data_len:
            raise LofiError(MODEL_LOAD_FAILED,
                            f"damaged or truncated weight file {path}: tensor {name} lies past the end")
    return header, 8 + n


class LazyTensor:
    """A tensor read on demand: shape and dtype now, the values at `np.asarray` (each time anew,
    from the file; nothing is cached). reshape/transpose/T/indexing/astype stay lazy, so a
    sanitize step that only renames and re-lays-out keys costs no memory."""

    __slots__ = ("shape", "dtype", "_read")

    def __init__(self, shape, dtype, read):
        self.shape, self.dtype, self._read = tuple(int(d) for d in shape), np.dtype(dtype), read

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def read(self) -> np.ndarray:
        return self._read()

    def __array__(self, dtype=None, copy=None):
        a = self._read()
        return a if dtype is None else a.astype(dtype, copy=False)

    def _then(self, shape, fn, dtype=None) -> "LazyTensor":
        return LazyTensor(shape, dtype or self.dtype, lambda: fn(self._read()))

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = int(np.prod([d for d in shape if d != -1]))
            shape = tuple(self.size // max(known, 1) if d == -1 else d for d in shape)
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(shape)}")
        return self._then(shape, lambda a: a.reshape(shape))

    def transpose(self, *axes):
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = axes or tuple(reversed(range(self.ndim)))
        return self._then(tuple(self.shape[i] for i in axes), lambda a: a.transpose(axes))

    @property
    def T(self):
        return self.transpose()

    def __getitem__(self, idx):
        shape = np.broadcast_to(np.empty((), np.uint8), self.shape)[idx].shape  # a view: no memory
        return self._then(shape, lambda a: a[idx])

    def astype(self, dtype, copy=True):
        return self._then(self.shape, lambda a: a.astype(dtype), dtype)

    def __repr__(self):
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype})"


def deferred(shape, dtype, fn) -> LazyTensor:
    """A tensor computed by `fn()` when converted (e.g. a folded weight norm)."""
    return LazyTensor(shape, dtype, fn)


def _reader(path: Path, offset: int, count: int, dtype, shape, widen: bool):
    def read() -> np.ndarray:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                a = np.fromfile(fh, dtype=dtype, count=count)
        except (OSError, ValueError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"cannot read {path}: {e}") from e
        if a.size != count:
            raise LofiError(MODEL_LOAD_FAILED, f"damaged or truncated weight file {path}")
        a = a.reshape(shape)
        return a.astype(np.float32) if widen and a.dtype == _bf16() else a
    return read


def open_safetensors(path: Path, widen: bool = False) -> dict[str, LazyTensor]:
    """{name: LazyTensor} of a safetensors file; nothing but the header is read now."""
    header, offset = read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dt = _dtype(info["dtype"])
        shape = tuple(info["shape"])
        count = int(np.prod(shape))
        if count * dt.itemsize != end - start:
            raise LofiError(MODEL_LOAD_FAILED, f"damaged weight file {path}: tensor {name} has "
                            f"{(end - start) // dt.itemsize} values for shape {list(shape)}")
        out[name] = LazyTensor(shape, np.float32 if widen and info["dtype"] == "BF16" else dt,
                               _reader(path, offset + start, count, dt, shape, widen))
    return out


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a file in memory (goldens, small files); bf16 widened to fp32."""
    return {k: np.asarray(v) for k, v in open_safetensors(path, widen=True).items()}


def load_component(root: str | Path, component: str, widen: bool = False) -> tuple[dict, dict]:
    """(config, {name: LazyTensor}) of one component, before any key mapping. Reads no weights:
    each tensor is read from disk when converted, in its file dtype (bf16 as ml_dtypes.bfloat16,
    or float32 with `widen`)."""
    cfg = read_config(root, component)
    weights: dict[str, LazyTensor] = {}
    for f in weight_files(component_dir(root, component)):
        weights.update(open_safetensors(f, widen))
    return cfg, weights


def check_weights(expected: dict[str, tuple], weights: dict, source: str) -> None:
    """A network's parameter shapes against mapped weights: any missing, unexpected or
    mis-shaped key is MODEL_LOAD_FAILED naming it (shared by the MLX and torch loaders)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise LofiError(MODEL_LOAD_FAILED, f"{source}: weights do not match the model: " + "; ".join(parts))
    for k, shape in expected.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise LofiError(MODEL_LOAD_FAILED, f"{source}: {k} has shape {list(weights[k].shape)}, "
                            f"the model expects {list(shape)}")

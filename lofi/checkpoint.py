"""The Hugging Face layout of ACE-Step/ACE-Step-v1-3.5B: folders, config.json, safetensors.

Engine-agnostic: tensors come back as numpy arrays (bf16 widened to fp32), so the MLX engine,
the ONNX exporter and the converter share one reader with one set of error messages.
"""

from __future__ import annotations

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
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


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


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    header, offset = read_header(path)
    out = {}
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LofiError(MODEL_LOAD_FAILED, f"cannot read {path}: {e}") from e
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = buf[offset + start: offset + end]
        dt = _DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if dt == "bf16":
            arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=dt)
        if arr.size != int(np.prod(shape)):
            raise LofiError(MODEL_LOAD_FAILED, f"damaged weight file {path}: tensor {name} has "
                            f"{arr.size} values for shape {list(shape)}")
        out[name] = arr.reshape(shape)
    return out


def load_component(root: str | Path, component: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, raw checkpoint tensors) of one component, before any key mapping."""
    cfg = read_config(root, component)
    weights: dict[str, np.ndarray] = {}
    for f in weight_files(component_dir(root, component)):
        weights.update(load_safetensors(f))
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

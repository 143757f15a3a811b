"""A MusicGen checkpoint's tensors under one prefix (`text_encoder.`, `decoder.`, ...), read one
at a time from the single-folder Hub layout, with the same strictness as lofi_cuda.build.weights:
missing or mis-shaped keys and keys nobody read are MODEL_LOAD_FAILED."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lofi.checkpoint import read_header, weight_files
from lofi.errors import MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError

from lofi_cuda.build.weights import Weights

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


class PrefixWeights(Weights):
    def __init__(self, root: str | Path, prefix: str, drop_prefixes=(), drop_parts=()):
        self.folder = Path(root)
        if not self.folder.is_dir():
            raise LofiError(MODEL_NOT_FOUND, f"MusicGen checkpoint not found: {root}")
        self.config = {}
        self.index = {}
        for f in weight_files(self.folder):
            header, offset = read_header(f)
            for k, info in header.items():
                if k != "__metadata__" and k.startswith(prefix):
                    self.index[k[len(prefix):]] = (f, info, offset)
        if not self.index:
            raise LofiError(MODEL_LOAD_FAILED, f"{root}: no weights under {prefix!r}")
        self.ignored = {k for k in self.index
                        if k.startswith(tuple(drop_prefixes)) or any(p in k for p in drop_parts)}
        self.used = set()

    def _read(self, key: str, row0: int = 0, rows: int | None = None) -> np.ndarray:
        path, info, offset = self._info(key)
        shape = tuple(info["shape"])
        bf16 = info["dtype"] == "BF16"
        if not bf16 and info["dtype"] not in _NP:
            raise LofiError(MODEL_LOAD_FAILED, f"{path}: tensor {key} has dtype {info['dtype']}")
        dt = np.dtype(np.uint16) if bf16 else np.dtype(_NP[info["dtype"]])
        row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        rows = (shape[0] if shape else 1) - row0 if rows is None else rows
        with open(path, "rb") as fh:
            fh.seek(offset + info["data_offsets"][0] + row0 * row * dt.itemsize)
            raw = np.fromfile(fh, dtype=dt, count=rows * row)
        if raw.size != rows * row:
            raise LofiError(MODEL_LOAD_FAILED, f"damaged weight file {path}: tensor {key} is short")
        if bf16:
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape((rows,) + shape[1:] if shape else ())

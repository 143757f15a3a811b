"""The checkpoint's tensors one at a time, read with plain file reads (no memory map, so pages
already written out do not stay resident), BF16 widened to fp32 by bit shifts.

`Weights` is strict like the other loaders: a missing or mis-shaped key is MODEL_LOAD_FAILED
naming it, and `finish()` rejects keys the network never read (a different model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lofi.checkpoint import _DTYPES, component_dir, read_config, read_header, weight_files
from lofi.errors import MODEL_LOAD_FAILED, LofiError


class Weights:
    def __init__(self, root: str | Path, component: str, drop_prefixes=(), drop_parts=()):
        self.folder = component_dir(root, component)
        self.config = read_config(root, component)
        self.index: dict[str, tuple[Path, dict, int]] = {}
        for f in weight_files(self.folder):
            header, offset = read_header(f)
            for k, info in header.items():
                if k != "__metadata__":
                    self.index[k] = (f, info, offset)
        self.ignored = {k for k in self.index
                        if k.startswith(tuple(drop_prefixes)) or any(p in k for p in drop_parts)}
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def keys(self):
        return self.index.keys()

    def shape(self, key: str) -> tuple:
        return tuple(self._info(key)[1]["shape"])

    def _info(self, key):
        if key not in self.index:
            raise LofiError(MODEL_LOAD_FAILED, f"{self.folder}: missing weight {key}")
        return self.index[key]

    def _read(self, key: str, row0: int = 0, rows: int | None = None) -> np.ndarray:
        path, info, offset = self._info(key)
        shape = tuple(info["shape"])
        bf16 = info["dtype"] == "BF16"  # _DTYPES holds no numpy type for it (read as uint16)
        dt = np.dtype(np.uint16 if bf16 else _DTYPES[info["dtype"]])
        item = dt.itemsize
        row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        rows = (shape[0] if shape else 1) - row0 if rows is None else rows
        start = offset + info["data_offsets"][0] + row0 * row * item
        with open(path, "rb") as fh:
            fh.seek(start)
            raw = np.fromfile(fh, dtype=dt, count=rows * row)
        if raw.size != rows * row:
            raise LofiError(MODEL_LOAD_FAILED, f"damaged weight file {path}: tensor {key} is short")
        if bf16:
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape((rows,) + shape[1:] if shape else ())

    def get(self, key: str, shape: tuple | None = None) -> np.ndarray:
        """The whole tensor as fp32, checked against `shape` when given."""
        self._check(key, shape)
        self.used.add(key)
        return self._read(key)

    def chunks(self, key: str, shape: tuple | None = None, max_bytes: int = 64 << 20):
        """(shape, iterator of fp32 row blocks): large tensors never whole in memory."""
        self._check(key, shape)
        self.used.add(key)
        full = self.shape(key)
        row = max(1, int(np.prod(full[1:], dtype=np.int64)) * 4)
        step = max(1, max_bytes // row)
        n = full[0] if full else 1
        return full, (self._read(key, r, min(step, n - r)) for r in range(0, n, step))

    def _check(self, key, shape):
        have = self.shape(key)
        if shape is not None and tuple(have) != tuple(shape):
            raise LofiError(MODEL_LOAD_FAILED, f"{self.folder}: weight {key} has shape {list(have)}, "
                            f"the network expects {list(shape)}")

    def finish(self) -> None:
        extra = sorted(set(self.index) - self.used - self.ignored)
        if extra:
            more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
            raise LofiError(MODEL_LOAD_FAILED, f"{self.folder}: unexpected weights "
                            f"{', '.join(extra[:5])}{more}: not the network this build describes")


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """W = g * v / ||v||, the norm over every axis but 0 (legacy torch weight_norm, dim=0)."""
    v = v.astype(np.float64)
    norm = np.sqrt((v * v).reshape(v.shape[0], -1).sum(axis=1))
    return ((g.reshape(-1).astype(np.float64) / norm).reshape((-1,) + (1,) * (v.ndim - 1)) * v
            ).astype(np.float32)

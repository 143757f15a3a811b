"""LoRA adapters for the DiT in PEFT format (`pytorch_lora_weights.safetensors`, spec §12.6).

The reference (diffusers 0.33.1 `load_lora_adapter`, prefix None) reads no alpha from the file,
so PEFT's lora_alpha defaults to r and the effective weight is W + lora_weight * (B @ A): the
same rule here, whatever `lora_adapter_metadata` a newer trainer stored. Engines merge the
deltas into their weights once (and restore the saved base weights when switched off); numpy
only, so both engines share the parsing and the arithmetic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lofi.errors import INVALID_PARAMS, LofiError

LORA_FILE = "pytorch_lora_weights.safetensors"
_A, _B = ".lora_A.weight", ".lora_B.weight"


def _bad(msg: str):
    raise LofiError(INVALID_PARAMS, f"lora: {msg}", {"field": "lora"})


def refuse_quantized(lora, quantize) -> None:
    """A LoRA merges into full-precision DiT weights; quantized ones have none to merge into."""
    if lora is not None and quantize:
        _bad(f"adapters merge into full-precision DiT weights; not available with {quantize}-bit "
             "quantized ones (--quantize / LOFI_QUANTIZE): generate without one or the other")


@dataclass
class LoraRef:
    name: str
    path: Path     # the safetensors file
    sha256: str


def resolve_lora(spec: str, root: Path | None = None) -> LoraRef:
    """A name under root (`<root>/<name>/pytorch_lora_weights.safetensors`), a folder holding
    that file, or the file itself."""
    p = Path(spec).expanduser()
    candidates = []
    if root is not None and "/" not in spec and "\\" not in spec and spec not in (".", ".."):
        candidates.append(Path(root) / spec / LORA_FILE)
    candidates += [p / LORA_FILE, p] if p.suffix != ".safetensors" else [p]
    for c in candidates:
        try:  # a name too long or not encodable for the filesystem is simply not there
            if c.is_file():
                return LoraRef(spec, c, _sha256(c))
        except (OSError, ValueError):
            continue
    where = f" (looked in {Path(root) / spec})" if root is not None else ""
    _bad(f"no adapter {spec!r}: expected a folder holding {LORA_FILE} or the file itself{where}")


def list_loras(root: Path) -> list[dict]:
    out = []
    if not Path(root).is_dir():
        return out
    for d in sorted(Path(root).iterdir()):
        f = d / LORA_FILE
        if d.is_dir() and not d.is_symlink() and f.is_file():
            out.append({"name": d.name, "path": str(f), "bytes": f.stat().st_size})
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_adapter(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (A [r, in], B [out, r])} with module paths relative to the DiT root."""
    from lofi.checkpoint import load_safetensors
    if Path(path).is_dir():
        path = Path(path) / LORA_FILE
    try:
        raw = load_safetensors(Path(path))
    except LofiError:
        raise
    except Exception as e:
        _bad(f"cannot read {path}: {e}")
    pairs: dict[str, dict] = {}
    for k, v in raw.items():
        key = k[len("transformer."):] if k.startswith("transformer.") else k
        for suffix, slot in ((_A, "A"), (_B, "B")):
            if key.endswith(suffix):
                pairs.setdefault(key[:-len(suffix)], {})[slot] = np.asarray(v, np.float32)
                break
        else:
            _bad(f"{path}: unexpected key {k!r} (a PEFT adapter holds only lora_A/lora_B weights)")
    if not pairs:
        _bad(f"{path} holds no LoRA weights")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            _bad(f"{path}: {module} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            _bad(f"{path}: {module} has inconsistent shapes A {a.shape}, B {b.shape}")
        out[module] = (a, b)
    return out


def deltas(adapter: dict, weight: float) -> dict[str, np.ndarray]:
    """{'<module>.weight': lora_weight * B @ A} (float32, product taken in float64)."""
    return {f"{m}.weight": (float(weight) * (b.astype(np.float64) @ a.astype(np.float64)))
            .astype(np.float32) for m, (a, b) in adapter.items()}


def check_targets(delta: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
    """Every delta must land on a weight of the same shape in the network."""
    for name, d in delta.items():
        if name not in shapes:
            _bad(f"the adapter targets {name[:-len('.weight')]}, which the DiT does not have")
        if tuple(shapes[name]) != d.shape:
            _bad(f"the adapter's {name} delta is {d.shape}, the DiT weight {tuple(shapes[name])}")

"""The MLX engine: runs ACE-Step's four networks, loading each when its stage starts.

Memory policy: by default a network is dropped when its stage ends (UMT5 after text encoding,
the DiT after sampling, ...), so peak memory is the largest stage rather than the sum.
`keep_loaded=True` keeps them resident between jobs.
"""

from __future__ import annotations

import gc
import hashlib
import threading
from collections import OrderedDict
import time
from pathlib import Path

import numpy as np

from lofi.errors import MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError
from lofi.memory import trim
from lofi_mlx.mlxrt import BLAS
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import set_threads
from lofi_mlx.acestep.common import DTYPES


class MLXEngine:
    name = "mlx"

    def __init__(self, checkpoint: str | Path, precision: str = "auto", device: str = "auto",
                 keep_loaded: bool = False, threads: int | None = None,
                 native_dir: str | Path | None = None, quantize: int | None = None):
        if precision not in DTYPES and precision != "auto":
            raise LofiError(MODEL_LOAD_FAILED, f"unknown precision {precision!r}")
        from lofi_mlx.quantize import GROUP_SIZE, check_bits
        self.quantize = check_bits(quantize)  # bits per DiT block weight, None: the run dtype
        self.quantize_group = GROUP_SIZE      # when quantizing on load (benchmarks vary it)
        self.checkpoint = Path(checkpoint)
        self.keep_loaded = keep_loaded
        # MLX-native (already sanitized) weights: a conversion or a synthetic benchmark checkpoint
        self.native_dir = Path(native_dir) if native_dir else None
        set_threads(threads)
        if device == "cpu" or (device == "auto" and not _gpu_available()):
            mx.set_default_device(mx.cpu)
            self.device = "cpu"
        else:
            if device == "gpu" and not _gpu_available():
                raise LofiError(MODEL_LOAD_FAILED, "LOFI_DEVICE=gpu but MLX sees no GPU on this machine")
            mx.set_default_device(mx.gpu)
            self.device = "gpu"
        from lofi.engines import resolve_precision
        self.precision = resolve_precision("mlx", precision, self.device)
        self.dtype = DTYPES[self.precision]
        self.blas = BLAS
        self._models: dict = {}
        self.load_times: dict[str, float] = {}  # seconds spent loading, per stage (benchmarks)
        self.weight_bytes: dict[str, int] = {}  # size of each network's weights once loaded
        self._lock = threading.RLock()
        self._lora = None       # (path, weight) of the adapter merged into the DiT, or None
        self._lora_delta = None
        # the context's cross-attention K/V per condition: constant over a sampling run
        self._kv: OrderedDict = OrderedDict()

    # -- memory policy ---------------------------------------------------------------------
    def load(self, stage: str) -> None:
        """Load a stage's network now (otherwise it loads on first use)."""
        self._get(stage)

    def _get(self, stage: str):
        with self._lock:
            if stage not in self._models:
                t0 = time.perf_counter()
                self._models[stage] = self._load(stage)
                if stage == "transformer" and self._lora_delta is not None:
                    self._merge(self._models[stage], self._lora_delta, +1)
                self.load_times[stage] = self.load_times.get(stage, 0.0) + time.perf_counter() - t0
                from mlx.utils import tree_flatten
                self.weight_bytes[stage] = sum(
                    v.nbytes for _, v in tree_flatten(self._models[stage].parameters()))
            return self._models[stage]

    # -- LoRA ------------------------------------------------------------------------------
    def set_lora(self, path, weight: float = 1.0) -> None:
        """Merge a PEFT adapter into the DiT at lora_weight (None: none). A resident DiT gets
        the previous delta taken out and the new one merged; a later load merges on load."""
        from lofi.acestep.lora import deltas, load_adapter, refuse_quantized
        refuse_quantized(path, self.quantize)
        key = None if path is None else (str(path), float(weight))
        with self._lock:
            if key == self._lora:
                return
            new = None if key is None else deltas(load_adapter(path), weight)
            model = self._models.get("transformer")
            if model is not None:
                if new is not None:
                    self._check(model, new)
                if self._lora_delta is not None:
                    self._merge(model, self._lora_delta, -1)
                if new is not None:
                    self._merge(model, new, +1)
            self._lora, self._lora_delta = key, new

    @staticmethod
    def _check(model, delta) -> None:
        from mlx.utils import tree_flatten
        from lofi.acestep.lora import check_targets
        check_targets(delta, {k: v.shape for k, v in tree_flatten(model.parameters())})

    def _merge(self, model, delta, sign: int) -> None:
        # W +/- delta computed in fp32 then cast; unmerging restores W to rounding (~1 ulp)
        from mlx.utils import tree_flatten, tree_unflatten
        self._check(model, delta)
        params = dict(tree_flatten(model.parameters()))
        upd = [(k, (params[k].astype(mx.float32) + sign * mx.array(d)).astype(params[k].dtype))
               for k, d in delta.items()]
        model.update(tree_unflatten(upd))
        mx.eval(model.parameters())
        self._kv.clear()  # cross-attention K/V of the old weights

    _COMPONENT = {"text_encoder": ("text_encoder", None), "transformer": ("transformer", None),
                  "dcae": ("dcae", ("decoder",)), "dcae_encoder": ("dcae", ("encoder",)),
                  "vocoder": ("vocoder", None)}

    def converted(self, component: str) -> bool:
        """A fresh MLX-native conversion (`lofi setup`) usable at this engine's precision:
        the same precision, or fp16 widened to an fp32 run (exact)."""
        try:
            from convert.to_mlx import component_fresh, converted_precision
        except ImportError:
            return False
        conv = converted_precision(self.checkpoint)
        # an fp32 run widens fp16 or bf16 files exactly; bf16 and fp16 do not convert each other
        if conv is None or not (conv == self.precision or self.precision == "fp32"):
            return False
        if component == "transformer":  # usable unquantized (quantized on load) or at our bits
            from convert.to_mlx import converted_quantization
            bits = (converted_quantization(self.checkpoint, component) or {}).get("bits")
            if bits is not None and bits != self.quantize:
                return False
        return component_fresh(self.checkpoint, component, conv)

    def _load(self, stage: str):
        model = self._load_network(stage)
        if stage == "transformer" and self.quantize:
            from lofi_mlx.quantize import quantization_of, quantize_dit
            if quantization_of(model) is None:
                quantize_dit(model, self.quantize, self.quantize_group)
        return model

    def _load_network(self, stage: str):
        comp, parts = self._COMPONENT[stage]
        if self.native_dir is not None or self.converted(comp):
            from lofi.checkpoint import read_config
            from lofi_mlx.acestep.native import load_native
            folder = self.native_dir or self.checkpoint / "mlx"
            # widen only (fp16 file, fp32 run); never narrow a module's fp32 islands
            dtype = self.dtype if self.precision == "fp32" else None
            return load_native(folder / f"{comp}.safetensors", comp,
                               read_config(self.checkpoint, comp), parts, dtype)
        try:
            if stage == "text_encoder":
                from lofi_mlx.acestep import umt5
                return umt5.load(self.checkpoint, self.precision)
            if stage == "transformer":
                from lofi_mlx.acestep import dit
                return dit.load(self.checkpoint, self.precision)
            if stage == "dcae":
                from lofi_mlx.acestep import dcae
                return dcae.load(self.checkpoint, self.precision, parts=("decoder",))
            if stage == "dcae_encoder":
                from lofi_mlx.acestep import dcae
                return dcae.load(self.checkpoint, self.precision, parts=("encoder",))
            if stage == "vocoder":
                from lofi_mlx.acestep import vocoder
                return vocoder.load(self.checkpoint, self.precision)
        except LofiError:
            raise
        except MemoryError as e:
            raise LofiError(MODEL_LOAD_FAILED, f"out of memory loading {stage}") from e
        except Exception as e:  # a damaged file surfaces here as anything
            raise LofiError(MODEL_LOAD_FAILED, f"cannot load {stage} from {self.checkpoint}: {e}") from e
        raise ValueError(f"unknown stage {stage}")

    def release(self, stage: str | None = None) -> None:
        with self._lock:
            if stage is None:
                self._models.clear()
            else:
                self._models.pop(stage, None)
            if stage in (None, "transformer"):
                self._kv.clear()
        gc.collect()
        mx.clear_cache()
        trim()  # MLX's freed buffers go back to glibc's heap, which keeps them otherwise

    def end_stage(self, stage: str) -> None:
        """Called by the pipeline when a stage is finished; applies the memory policy."""
        if not self.keep_loaded:
            self.release(stage)

    def loaded(self) -> list[str]:
        return list(self._models)

    def reset_peak(self) -> None:
        mx.reset_peak_memory()

    def memory(self) -> dict:
        return {"active": int(mx.get_active_memory()), "peak": int(mx.get_peak_memory()),
                "cache": int(mx.get_cache_memory())}

    # -- networks --------------------------------------------------------------------------
    def _arr(self, x: np.ndarray):
        return mx.array(np.asarray(x, dtype=np.float32)).astype(self.dtype)

    def encode_text(self, input_ids, attention_mask, erg: bool = False) -> np.ndarray:
        from lofi_mlx.acestep.umt5 import erg_q_scale
        model = self._get("text_encoder")
        q_scale = erg_q_scale(model.config.num_layers) if erg else None
        out = model(mx.array(np.asarray(input_ids, np.int32)),
                    mx.array(np.asarray(attention_mask, np.int32)), q_scale=q_scale)
        return _to_numpy(out, "text encoder")

    def encode_context(self, text_hidden, text_mask, lyric_ids, lyric_mask, erg_lyric=False):
        model = self._get("transformer")
        ctx, ctx_mask = model.encode(self._arr(text_hidden), mx.array(np.asarray(text_mask, np.int32)),
                                     mx.array(np.asarray(lyric_ids, np.int32)),
                                     mx.array(np.asarray(lyric_mask, np.int32)), erg_lyric=erg_lyric)
        return _to_numpy(ctx, "DiT encode"), np.asarray(ctx_mask.astype(mx.float32))

    def velocity(self, x, timestep, ctx, ctx_mask, erg) -> np.ndarray:
        model = self._get("transformer")
        ctx = np.ascontiguousarray(ctx, dtype=np.float32)
        v = model.decode(self._arr(x), mx.array(np.asarray(timestep, np.float32)), self._arr(ctx),
                         mx.array(np.asarray(ctx_mask, np.float32)),
                         erg=mx.array(np.asarray(erg, bool)), cross_kv=self._cross_kv(model, ctx))
        return _to_numpy(v, "DiT")

    KV_CACHE_BYTES = 512 << 20

    def _cross_kv(self, model, ctx: np.ndarray):
        """Every block's K/V of the context, computed once per condition rather than every step
        (3 % of an instrumental's step at full size, ~40 % with 300 lyric tokens; same values).
        Kept for the latest contexts up to KV_CACHE_BYTES; a longer context is recomputed."""
        key = (ctx.shape, hashlib.blake2b(ctx.tobytes(), digest_size=16).digest())
        with self._lock:
            hit = self._kv.get(key)
            if hit is not None:
                self._kv.move_to_end(key)
                return hit[0]
        kv = model.cross_kv(self._arr(ctx))
        mx.eval(kv)
        size = sum(a.nbytes for pair in kv for a in pair)
        if size <= self.KV_CACHE_BYTES:
            with self._lock:
                self._kv[key] = (kv, size)
                while sum(n for _, n in self._kv.values()) > self.KV_CACHE_BYTES:
                    self._kv.popitem(last=False)
        return kv

    def dcae_decode(self, latents) -> np.ndarray:
        model = self._get("dcae")
        # One item at a time like the reference: the DCAE attention is global, and batch 1 bounds memory.
        return np.concatenate([_to_numpy(model.decode_latents(self._arr(latents[i:i + 1])), "DCAE")
                               for i in range(latents.shape[0])])

    def vocode(self, mel) -> np.ndarray:
        model = self._get("vocoder")
        b, c, m, f = mel.shape
        # windowed with overlap: whole-length output, bounded conv workspace for 240 s tracks
        wave = model.decode(self._arr(np.asarray(mel).reshape(b * c, m, f)))
        return _to_numpy(wave, "vocoder").reshape(b, c, -1)

    def dcae_encode(self, mel) -> np.ndarray:
        model = self._get("dcae_encoder")
        return np.concatenate([_to_numpy(model.encode_mel(self._arr(mel[i:i + 1])), "DCAE encoder")
                               for i in range(mel.shape[0])])


def _to_numpy(x, what: str) -> np.ndarray:
    out = np.asarray(x.astype(mx.float32))
    if not np.all(np.isfinite(out)):
        raise LofiError(MODEL_INFERENCE_FAILED, f"{what} produced NaN or Inf values")
    return out


def _gpu_available() -> bool:
    try:
        if mx.metal.is_available():
            return True
        return hasattr(mx, "cuda") and bool(mx.cuda.is_available())
    except Exception:
        return False

"""The ONNX Runtime engine: ACE-Step's graphs on CUDA (NVIDIA GPUs) or the CPU.

Implements the Engine protocol (lofi/engine.py) the shared sampler and pipeline drive,
with the same memory policy as the MLX engine: a stage's sessions are created when the stage
first runs and dropped when it ends (`end_stage`), unless `keep_loaded=True`.

Graphs come from `<checkpoint>/onnx/<precision>/` (or LOFI_HOME's `onnx/` for a checkpoint
elsewhere) when their manifest is fresh, and are otherwise built once by lofi_cuda.build (the
`onnx` package, no PyTorch); see lofi_cuda/graphs.py. Session creation failures are MODEL_LOAD_FAILED, failures while running
MODEL_INFERENCE_FAILED.

Settings: `threads` (intra-op threads), LOFI_ORT_OPT_LEVEL = disable|basic|extended|all
(graph optimisation, default all).
"""

from __future__ import annotations

import gc
import hashlib
import os
import resource
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from lofi.acestep.configs import DCAEConfig, VocoderConfig
from lofi.acestep.tiling import DCAE_LOW_TILE, DCAE_TILE, dcae_decode_tables, vocoder_halo, windows
from lofi.checkpoint import read_config
from lofi.errors import INVALID_PARAMS, MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError
from lofi.memory import trim

from lofi_cuda import graphs as G
from lofi_cuda import tables
from lofi_cuda.runtime import CPU, CUDA, cuda_problem, cuda_usable
from lofi_cuda.runtime import ort as _ort

PRECISIONS = ("fp32", "fp16")
ERG_SCALE = 0.01
TEXT_ERG_LAYERS = (8, 10)   # half-open: UMT5 blocks 8-9
LYRIC_ERG_LAYERS = (4, 5)
# the graphs each stage needs
STAGE_GRAPHS = {"text_encoder": ("text_encoder",), "transformer": ("dit_encode", "dit_decode"),
                "dcae": ("dcae_decode",), "dcae_encoder": ("dcae_encode",), "vocoder": ("vocoder",)}
# Time tiles for the decoders (latent frames for the DCAE's upper half, mel frames for the
# vocoder); each tile runs with an exact halo (lofi.acestep.tiling), so memory stays flat.
VOCODER_TILE = 2048
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class ONNXEngine:
    name = "onnx"

    def __init__(self, checkpoint: str | Path, precision: str = "auto", device: str = "auto",
                 threads: int | None = None, keep_loaded: bool = False, log=None,
                 quantize: int | None = None):
        if quantize not in (None, 8):
            raise LofiError(INVALID_PARAMS, f"the ONNX engine quantizes the DiT to 8 bits (int8 "
                            f"MatMul weights) or not at all, not {quantize!r}")
        self.quantize = quantize
        if precision not in PRECISIONS and precision != "auto":
            raise LofiError(MODEL_LOAD_FAILED, f"the ONNX engine runs fp32 or fp16, not {precision!r}")
        if device not in ("auto", "cpu", "gpu", "cuda"):
            raise LofiError(INVALID_PARAMS, f"unknown device {device!r} (auto, cpu or gpu)")
        self.ort = _ort()
        self.checkpoint = Path(checkpoint)
        self.precision = precision
        self.keep_loaded = keep_loaded
        self.threads = threads
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if device == "cpu":
            self.device = "cpu"
        elif cuda_usable():
            self.device = "cuda"
        elif device == "auto":
            self.device = "cpu"
        else:
            raise LofiError(MODEL_LOAD_FAILED, f"LOFI_DEVICE=gpu but ONNX Runtime cannot use the GPU: "
                            f"{cuda_problem()}")
        from lofi.engines import resolve_precision
        self.precision = resolve_precision("onnx", precision, self.device)
        if quantize and (self.device == "cuda" or self.precision != "fp32"):
            raise LofiError(INVALID_PARAMS, "int8 DiT weights are for ONNX Runtime's fp32 graphs on the "
                            "CPU; on CUDA use precision fp16 (LOFI_DEVICE=cpu to run the int8 graph)")
        self.providers = [CUDA, CPU] if self.device == "cuda" else [CPU]
        level = os.environ.get("LOFI_ORT_OPT_LEVEL", "all").lower()
        if level not in OPT_LEVELS:
            raise LofiError(INVALID_PARAMS, f"LOFI_ORT_OPT_LEVEL must be one of {', '.join(OPT_LEVELS)}")
        self.opt_level = getattr(self.ort.GraphOptimizationLevel, OPT_LEVELS[level])
        self._graph_dir: Path | None = None
        self._dims: dict = {}
        self._sessions: dict[str, object] = {}
        self._stages: list[str] = []
        self._device_cache: OrderedDict = OrderedDict()  # CUDA: constant inputs kept on the GPU
        self._lock = threading.RLock()
        self.load_times: dict[str, float] = {}  # seconds creating sessions, per stage (benchmarks)
        self._lora = None        # (path, weight) of the adapter fed to the DiT graphs, or None
        self._lora_delta = None
        self.weight_bytes: dict[str, int] = {}  # size of each stage's graph files (benchmarks)

    # -- graphs and sessions ---------------------------------------------------------------
    def graph_dir(self) -> Path:
        with self._lock:
            if self._graph_dir is None:
                from lofi_cuda.prepare import ensure_graphs
                folder = ensure_graphs(self.checkpoint, self.precision, log=self.log)
                self._dims = G.read_manifest(folder)["dims"]
                self._graph_dir = folder
            return self._graph_dir

    def _options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.opt_level
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        so.log_severity_level = 3
        return so

    def _session(self, stage: str, graph: str):
        with self._lock:
            if graph in self._sessions:
                return self._sessions[graph]
            path = self.graph_dir() / f"{graph}.onnx"
            if graph == "dit_decode" and self.quantize:
                from lofi_cuda.quantize import ensure_quantized
                path = ensure_quantized(self.graph_dir(), graph, log=self.log)
            providers = self.providers
            if self.device == "cuda":
                providers = [(CUDA, {"arena_extend_strategy": "kSameAsRequested",
                                     "cudnn_conv_algo_search": "HEURISTIC"}), CPU]
            t0 = time.perf_counter()
            try:
                so = self._options()
                keep = self._lora_initializers(graph, so)  # alive as long as the session
                sess = self.ort.InferenceSession(str(path), sess_options=so, providers=providers)
                sess._lofi_lora_values = keep
            except MemoryError as e:
                raise LofiError(MODEL_LOAD_FAILED, f"out of memory loading {graph}") from e
            except Exception as e:  # a damaged graph or a provider failure surfaces as anything
                raise LofiError(MODEL_LOAD_FAILED, f"cannot create an ONNX Runtime session for {path}: "
                                f"{type(e).__name__}: {e}") from e
            if self.device == "cuda" and sess.get_providers()[0] != CUDA:
                raise LofiError(MODEL_LOAD_FAILED, f"{graph}: ONNX Runtime fell back to the CPU "
                                "(CUDA provider failed to initialise)")
            self._sessions[graph] = sess
            self.load_times[stage] = self.load_times.get(stage, 0.0) + time.perf_counter() - t0
            if stage not in self._stages:
                self.weight_bytes[stage] = 0
            self.weight_bytes[stage] += sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data"))
                                            if f.is_file())
            if stage not in self._stages:
                self._stages.append(stage)
            return sess

    # -- LoRA ------------------------------------------------------------------------------
    def set_lora(self, path, weight: float = 1.0) -> None:
        """Feed the DiT graphs W + lora_weight * B @ A for the adapter's targets (None: the
        exported weights). Open DiT sessions are closed so the next call rebuilds them."""
        from lofi.acestep.lora import deltas, load_adapter, refuse_quantized
        refuse_quantized(path, self.quantize)
        key = None if path is None else (str(path), float(weight))
        with self._lock:
            if key == self._lora:
                return
            delta = None if key is None else deltas(load_adapter(path), weight)
            if delta is not None:
                self._lora_check(delta)
            self._lora, self._lora_delta = key, delta
            self.release("transformer")

    def _lora_check(self, delta) -> None:
        from lofi.acestep.lora import check_targets
        m = G.read_manifest(self.graph_dir()) or {}
        mapped = {}
        for g in ("dit_encode", "dit_decode"):
            mapped.update(m.get("graphs", {}).get(g, {}).get("weights", {}))
        _, raw = _dit_weights(self.checkpoint)
        check_targets(delta, {k: raw[k].shape for k in mapped if k in raw})

    def _lora_initializers(self, graph: str, so) -> list:
        if self._lora_delta is None or graph not in ("dit_encode", "dit_decode"):
            return []
        spec = G.read_manifest(self.graph_dir())["graphs"][graph].get("weights", {})
        _, raw = _dit_weights(self.checkpoint)
        dtype = np.float16 if self.precision == "fp16" else np.float32
        keep = []
        for name, d in self._lora_delta.items():
            if name not in spec:
                continue  # a weight of the other DiT graph
            w = (raw[name].astype(np.float32) + d).astype(dtype)
            if spec[name]["transposed"]:
                w = w.T
            val = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w))
            so.add_initializer(spec[name]["init"], val)
            keep.append(val)
        return keep

    def release(self, stage: str | None = None) -> None:
        with self._lock:
            stages = list(self._stages) if stage is None else [stage]
            for s in stages:
                for g in STAGE_GRAPHS.get(s, ()):
                    self._sessions.pop(g, None)
                if s in self._stages:
                    self._stages.remove(s)
            if stage is None or stage == "transformer":
                self._device_cache.clear()
        gc.collect()
        trim()

    def end_stage(self, stage: str) -> None:
        """Called by the pipeline when a stage is finished; applies the memory policy."""
        if not self.keep_loaded:
            self.release(stage)

    def loaded(self) -> list[str]:
        return list(self._stages)

    def load(self, stage: str) -> None:
        """Open a stage's sessions now (otherwise they open on first use)."""
        for g in STAGE_GRAPHS[stage]:
            self._session(stage, g)

    def reset_peak(self) -> None:
        """The OS keeps the process's peak resident size; it cannot be reset from here."""

    def memory(self) -> dict:
        """Process memory as the OS sees it (ONNX Runtime exposes no allocator statistics):
        resident bytes now and at peak, plus the size of the graphs whose sessions are open."""
        try:
            with open("/proc/self/statm") as fh:
                active = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            active = 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        graph_bytes = 0
        if self._graph_dir is not None:
            for g in list(self._sessions):
                for f in (self._graph_dir / f"{g}.onnx", self._graph_dir / f"{g}.onnx.data"):
                    graph_bytes += f.stat().st_size if f.is_file() else 0
        return {"active": active, "peak": max(peak, active), "graphs": graph_bytes, "device": self.device}

    # -- running ---------------------------------------------------------------------------
    def _run(self, stage: str, graph: str, feeds: dict, what: str, constant: tuple = ()) -> list:
        sess = self._session(stage, graph)
        # an input the graph never reads is dropped by the exporter (e.g. q_scale in a DiT
        # shallower than the ERG blocks), so feed only what the session declares
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        try:
            if self.device == "cuda":
                outs = self._run_bound(sess, feeds, constant)
            else:
                outs = sess.run(None, feeds)
        except LofiError:
            raise
        except Exception as e:
            raise LofiError(MODEL_INFERENCE_FAILED, f"{what} failed: {type(e).__name__}: {e}") from e
        for o in outs:
            if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o)):
                raise LofiError(MODEL_INFERENCE_FAILED, f"{what} produced NaN or Inf values")
        return outs

    def _run_bound(self, sess, feeds: dict, constant: tuple) -> list:
        """IO binding: inputs that repeat across sampling steps (context, tables) stay on the
        GPU, outputs are allocated there and copied back once."""
        binding = sess.io_binding()
        for name, arr in feeds.items():
            if name in constant:
                binding.bind_ortvalue_input(name, self._on_device(arr))
            else:
                binding.bind_cpu_input(name, arr)
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cuda")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _on_device(self, arr: np.ndarray):
        key = (arr.shape, arr.dtype.str, hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
        ov = self._device_cache.get(key)
        if ov is None:
            ov = self.ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
            self._device_cache[key] = ov
            while len(self._device_cache) > 16:
                self._device_cache.popitem(last=False)
        else:
            self._device_cache.move_to_end(key)
        return ov

    def _dim(self, key: str):
        self.graph_dir()
        return self._dims[key]

    @staticmethod
    def _f32(x) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    @staticmethod
    def _i64(x) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.int64)

    # -- the Engine protocol ---------------------------------------------------------------
    def encode_text(self, input_ids, attention_mask, erg: bool = False) -> np.ndarray:
        n = int(np.shape(input_ids)[1])
        layers = self._dim("text_layers")
        lo, hi = TEXT_ERG_LAYERS
        q = np.array([ERG_SCALE if erg and lo <= i < hi else 1.0 for i in range(layers)], np.float32)
        feeds = {"input_ids": self._i64(input_ids), "attention_mask": self._i64(attention_mask),
                 "buckets": tables.t5_buckets(n, self._dim("text_buckets"), self._dim("text_max_distance")),
                 "q_scale": q}
        return self._run("text_encoder", "text_encoder", feeds, "text encoder")[0]

    def encode_context(self, text_hidden, text_mask, lyric_ids, lyric_mask, erg_lyric: bool = False):
        n = int(np.shape(lyric_ids)[1])
        blocks = self._dim("lyric_blocks")
        q = np.array([ERG_SCALE if erg_lyric and i in LYRIC_ERG_LAYERS else 1.0 for i in range(blocks)],
                     np.float32)
        feeds = {"text_hidden": self._f32(text_hidden), "text_mask": self._i64(text_mask),
                 "lyric_ids": self._i64(lyric_ids), "lyric_mask": self._i64(lyric_mask),
                 "pe": tables.relative_positions(n, self._dim("lyric_width"), self.precision),
                 "rel_index": tables.relative_index(n), "lyric_q_scale": q}
        ctx, mask = self._run("transformer", "dit_encode", feeds, "DiT encode")
        return ctx, mask

    def velocity(self, x, timestep, ctx, ctx_mask, erg) -> np.ndarray:
        x = self._f32(x)
        b, t = x.shape[0], x.shape[-1]
        ctx = self._f32(ctx)
        d, theta = self._dim("head_dim"), self._dim("rope_theta")
        cos, sin = tables.rope_tables(t, d, theta, self.precision)
        cc, sc = tables.rope_tables(ctx.shape[1], d, theta, self.precision)
        feeds = {"x": x, "timestep": self._f32(np.broadcast_to(np.reshape(timestep, -1), (b,))),
                 "ctx": ctx, "ctx_mask": self._f32(ctx_mask),
                 "q_scale": np.where(np.asarray(erg, bool).reshape(-1), ERG_SCALE, 1.0).astype(np.float32),
                 "cos": cos, "sin": sin, "cos_ctx": cc, "sin_ctx": sc}
        return self._run("transformer", "dit_decode", feeds, "DiT",
                         constant=("ctx", "ctx_mask", "cos", "sin", "cos_ctx", "sin_ctx"))[0]

    def _config(self, component: str):
        cls = DCAEConfig if component == "dcae" else VocoderConfig
        return cls.from_dict(read_config(self.checkpoint, component))

    def _tiled(self, stage: str, graph: str, name: str, x: np.ndarray, tile: int, halo: int,
               factor: int, what: str) -> np.ndarray:
        """Run `graph` over time windows of `x` (last axis) and keep each tile's outputs (the
        last axis of the output, `factor` output frames per input frame)."""
        parts = []
        for w in windows(x.shape[-1], tile, halo):
            y = self._run(stage, graph, {name: np.ascontiguousarray(x[..., w.a:w.b])}, what)[0]
            parts.append(y[..., (w.s - w.a) * factor:(w.e - w.a) * factor])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def dcae_decode(self, latents, tile: int = DCAE_TILE, low_tile: int = DCAE_LOW_TILE) -> np.ndarray:
        lat = self._f32(latents)
        # the graph loops over these windows (lofi_cuda.build.dcae): memory stays flat with length
        tables = dcae_decode_tables(self._config("dcae"), lat.shape[-1], tile, low_tile)
        # one item at a time like the reference: the DCAE attention is global, batch 1 bounds memory
        return np.concatenate([self._run("dcae", "dcae_decode", {"latents": lat[i:i + 1], **tables},
                                         "DCAE")[0] for i in range(lat.shape[0])])

    def vocode(self, mel, tile: int = VOCODER_TILE) -> np.ndarray:
        mel = self._f32(mel)
        b, c, m, f = mel.shape
        cfg = self._config("vocoder")
        wave = self._tiled("vocoder", "vocoder", "mel", mel.reshape(b * c, m, f), tile,
                           vocoder_halo(cfg), cfg.hop, "vocoder")
        return wave.reshape(b, c, -1)

    def dcae_encode(self, mel) -> np.ndarray:
        mel = self._f32(mel)
        return np.concatenate([self._run("dcae_encoder", "dcae_encode", {"mel": mel[i:i + 1]},
                                         "DCAE encoder")[0] for i in range(mel.shape[0])])


def _dit_weights(checkpoint: Path):
    from lofi.checkpoint import load_component
    return load_component(checkpoint, "transformer")

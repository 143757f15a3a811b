"""The ONNX Runtime engine for MusicGen: the same interface as lofi_mlx.musicgen.engine
(encode_text, decoder_session, decode_audio, quantizer_embeddings), on the graphs that
lofi_cuda.build.musicgen makes from the checkpoint (built once, cached like the ACE-Step graphs).

Memory policy, device choice, precision and error handling are the ACE-Step ONNX engine's
(lofi_cuda.engine.ONNXEngine): a stage's sessions open on first use and close at `end_stage`
unless keep_loaded. On CUDA the decoder's caches stay on the GPU between steps (IO binding).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np

from lofi.errors import MODEL_INFERENCE_FAILED, LofiError
from lofi.memory import trim
from lofi.musicgen.configs import load_config

from lofi_cuda import tables
from lofi_cuda.engine import ONNXEngine

STAGES = {"text_encoder": ("mg_text_encoder",), "decoder": ("mg_cross_kv", "mg_decoder", "mg_decoder_cat"),
          "encodec": ("mg_encodec_decode",)}
CACHE_STEP = 256  # cache buffer growth (columns): the step reads at most this many unused ones
MASKED = np.float32(-1e30)  # finite, as in the graphs: an all-masked row gives 0, not NaN


def sinusoidal_positions(n: int, dim: int) -> np.ndarray:
    """transformers' MusicgenSinusoidalPositionalEmbedding [n, dim]: [cos | sin], fp32 like torch."""
    half = dim // 2
    f = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    ang = (np.arange(n, dtype=np.float32)[:, None] * f.astype(np.float32)[None]).astype(np.float64)
    return np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)


class DecoderSession:
    """One decoding run: the text's cross-attention keys/values (computed once) and the cache.

    On the CPU the cache is a numpy buffer per layer, grown CACHE_STEP columns at a time; the step
    graph reads it (unused columns masked) and returns the new columns, written in place. With IO
    binding (CUDA) the concatenating graph's caches stay on the device from step to step."""

    def __init__(self, engine: "MusicgenONNXEngine", enc_states, enc_mask):
        self.e = engine
        d = engine.config.decoder
        self.k, self.layers, self.v = d.num_codebooks, d.num_hidden_layers, d.vocab_size
        self.heads = d.num_attention_heads
        self.dh = d.hidden_size // self.heads
        enc = engine._f32(enc_states)
        self.rows = enc.shape[0]
        self.bound = engine.io_binding
        dev = self.dev = "cuda" if engine.device == "cuda" else "cpu"
        mask = np.asarray(enc_mask)
        self.fixed = {"cross_bias": np.where(mask > 0, np.float32(0), MASKED)
                      .astype(np.float32)[:, None, None, :]}
        sess = engine._session("decoder", "mg_cross_kv")
        names = [o.name for o in sess.get_outputs()]
        if self.bound:
            binding = sess.io_binding()
            binding.bind_cpu_input("enc_states", enc)
            for n in names:
                binding.bind_output(n, dev)
            engine._guard(lambda: sess.run_with_iobinding(binding), "MusicGen cross-attention")
            self.fixed.update(zip(names, binding.get_outputs()))
            self.fixed["cross_bias"] = engine.ort.OrtValue.ortvalue_from_numpy(
                self.fixed["cross_bias"], dev, 0)
        else:
            self.fixed.update(zip(names, engine._guard(lambda: sess.run(names, {"enc_states": enc}),
                                                       "MusicGen cross-attention")))
        self.kv_dtype = np.float16 if engine.precision == "fp16" else np.float32
        empty = np.zeros((self.rows, self.heads, 0, self.dh), self.kv_dtype)
        self.cache = {f"{i}.{w}": empty for i in range(self.layers) for w in ("key", "value")}
        self.offset = 0

    def __call__(self, ids: np.ndarray, all_positions: bool = False) -> np.ndarray:
        """ids [R*K, S] -> logits [R*K, V] of the last column (all_positions: [R*K, S, V])."""
        ids = np.asarray(ids, np.int64)
        rows, s = ids.shape
        off = self.offset
        if off + s > self.e.config.decoder.max_position_embeddings:
            raise LofiError(MODEL_INFERENCE_FAILED, f"MusicGen decoder positions beyond "
                            f"{self.e.config.decoder.max_position_embeddings}")
        feeds = {"ids": np.ascontiguousarray(ids.reshape(rows // self.k, self.k, s)),
                 "pos": self.e.positions()[off:off + s]}
        logits = self._bound(feeds, off, s) if self.bound else self._buffered(feeds, off, s)
        if not np.all(np.isfinite(logits)):
            raise LofiError(MODEL_INFERENCE_FAILED, "MusicGen decoder produced NaN or Inf values")
        self.offset += s
        if not all_positions:
            logits = logits[:, :, -1]
        return logits.reshape((rows,) + logits.shape[2:])

    def _buffered(self, feeds: dict, off: int, s: int) -> np.ndarray:
        cap = next(iter(self.cache.values())).shape[2]
        if off + s > cap:
            cap = -(-(off + s) // CACHE_STEP) * CACHE_STEP
            for n, a in self.cache.items():
                grown = np.zeros((self.rows, self.heads, cap, self.dh), self.kv_dtype)
                grown[:, :, :off] = a[:, :, :off]
                self.cache[n] = grown
        q = np.arange(s)[:, None]
        feeds["self_bias"] = np.concatenate(
            [np.where(np.arange(cap)[None, :] < off, np.float32(0), MASKED).repeat(s, axis=0),
             np.where(np.arange(s)[None, :] <= q, np.float32(0), MASKED)], axis=1).astype(np.float32)
        feeds.update((f"cache.{n}", a) for n, a in self.cache.items())
        feeds.update(self.fixed)
        sess = self.e._session("decoder", "mg_decoder")
        outs = [o.name for o in sess.get_outputs()]
        vals = dict(zip(outs, self.e._guard(lambda: sess.run(outs, feeds), "MusicGen decoder")))
        for n, a in self.cache.items():
            a[:, :, off:off + s] = vals[f"new.{n}"]
        return vals["logits"]

    def _bound(self, feeds: dict, off: int, s: int) -> np.ndarray:
        feeds["self_bias"] = np.where(np.arange(off + s)[None, :] <= np.arange(off, off + s)[:, None],
                                      np.float32(0), MASKED)
        sess = self.e._session("decoder", "mg_decoder_cat")
        outs = [o.name for o in sess.get_outputs()]
        binding = sess.io_binding()
        for n, a in feeds.items():
            binding.bind_cpu_input(n, np.ascontiguousarray(a))
        for n, a in self.cache.items():
            if isinstance(a, np.ndarray):
                binding.bind_cpu_input(f"past.{n}", a)
            else:
                binding.bind_ortvalue_input(f"past.{n}", a)
        for n, a in self.fixed.items():
            binding.bind_ortvalue_input(n, a)
        for n in outs:
            binding.bind_output(n, "cpu" if n == "logits" else self.dev)
        self.e._guard(lambda: sess.run_with_iobinding(binding), "MusicGen decoder")
        vals = dict(zip(outs, binding.get_outputs()))
        logits = vals.pop("logits").numpy()
        self.cache = {n.removeprefix("present."): a for n, a in vals.items()}
        return logits


class MusicgenONNXEngine(ONNXEngine):
    backend = "musicgen"

    def __init__(self, checkpoint: str | Path, precision: str = "auto", device: str = "auto",
                 threads: int | None = None, keep_loaded: bool = False, log=None):
        super().__init__(checkpoint, precision, device, threads, keep_loaded, log)
        self.config = load_config(self.checkpoint)
        self._positions = None
        # the decoder's caches stay where ORT made them (the GPU) from one step to the next
        self.io_binding = self.device == "cuda"

    # -- graphs and sessions ---------------------------------------------------------------
    def graph_dir(self) -> Path:
        with self._lock:
            if self._graph_dir is None:
                from lofi_cuda.graphs import read_manifest
                from lofi_cuda.musicgen.prepare import ensure_graphs
                folder = ensure_graphs(self.checkpoint, self.precision, log=self.log)
                self._dims = read_manifest(folder)["dims"]
                self._graph_dir = folder
            return self._graph_dir

    def _options(self):
        so = super()._options()
        # A step is ~500 small ops: spinning intra-op threads, on a CPU shared with other work,
        # wait for a descheduled peer at each op (2 threads: 2x slower than 1 without this).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def release(self, stage: str | None = None) -> None:
        with self._lock:
            for s in (list(self._stages) if stage is None else [stage]):
                for g in STAGES.get(s, ()):
                    self._sessions.pop(g, None)
                if s in self._stages:
                    self._stages.remove(s)
        gc.collect()
        trim()

    def load(self, stage: str) -> None:
        for g in STAGES[stage]:
            if g != ("mg_decoder" if self.io_binding else "mg_decoder_cat"):
                self._session(stage, g)

    def set_lora(self, path, weight: float = 1.0) -> None:
        if path is not None:
            raise LofiError(MODEL_INFERENCE_FAILED, "LoRA adapters are ACE-Step's; MusicGen takes none")

    def _guard(self, fn, what: str):
        try:
            return fn()
        except LofiError:
            raise
        except Exception as e:
            raise LofiError(MODEL_INFERENCE_FAILED, f"{what} failed: {type(e).__name__}: {e}") from e

    def positions(self) -> np.ndarray:
        if self._positions is None:
            d = self.config.decoder
            self._positions = sinusoidal_positions(d.max_position_embeddings, d.hidden_size)
        return self._positions

    # -- networks ------------------------------------------------------------------------------
    def encode_text(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """(T5 last_hidden_state [B, L, Dt], decoder cross-attention states [B, L, H] masked)."""
        t = self.config.text
        n = int(np.shape(input_ids)[1])
        feeds = {"input_ids": self._i64(input_ids), "attention_mask": self._i64(attention_mask),
                 "buckets": tables.t5_buckets(n, t.relative_attention_num_buckets,
                                              t.relative_attention_max_distance)}
        hidden, states = self._run("text_encoder", "mg_text_encoder", feeds, "T5 text encoder")
        return hidden, states

    def decoder_session(self, enc_states, enc_mask) -> DecoderSession:
        """A KV-cached decoder over rows whose text states are enc_states [R, L, H]."""
        return DecoderSession(self, enc_states, enc_mask)

    def _encodec(self, codes, names: list[str]) -> dict:
        sess = self._session("encodec", "mg_encodec_decode")
        feeds = {"codes": self._i64(codes)}
        outs = self._guard(lambda: sess.run(names, feeds), "EnCodec")
        for n, o in zip(names, outs):
            if not np.all(np.isfinite(o)):
                raise LofiError(MODEL_INFERENCE_FAILED, f"EnCodec {n} has NaN or Inf values")
        return dict(zip(names, outs))

    def decode_audio(self, codes, taps: dict | None = None) -> np.ndarray:
        """codes [B, Q, T] -> 32 kHz waveform [B, channels, T*hop] (EnCodec, one signal)."""
        names = ["audio"]
        if taps is not None:
            sess = self._session("encodec", "mg_encodec_decode")
            names += [o.name for o in sess.get_outputs() if o.name.startswith("tap.")]
        out = self._encodec(codes, names)
        if taps is not None:
            for n in names[1:]:
                taps[int(n.split(".")[1])] = out[n]
        return out["audio"]

    def quantizer_embeddings(self, codes) -> np.ndarray:
        """codes [B, Q, T] -> summed codebook embeddings [B, D, T]."""
        return self._encodec(codes, ["embeddings"])["embeddings"]

"""MusicGen's decoding loop in numpy: the delay pattern, batched classifier-free guidance,
temperature / top-k sampling, seeded (transformers' MusicgenForConditionalGeneration.generate).

Rows are (batch, codebook) flattened, row = b*K + k. Codebook k (stereo: rows 2c, 2c+1 share
delay c) is shifted right by its delay; row k is forced to the pad token (2048) at columns
<= delay and >= L - D + 1 + delay (D = codebooks per channel), the rest is predicted. Every step
predicts ALL rows, then the pattern overwrites the new column where it is not free (-1).

CFG runs the conditional and the null (unconditional) rows in one decoder call: cond rows first,
then uncond; guided = uncond + (cond - uncond) * scale in float32, then temperature, then top-k
(ties kept), then softmax + a draw from a seeded numpy generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lofi.errors import Cancelled

FREE = -1


def build_delay_pattern(input_ids: np.ndarray, pad: int, max_length: int, num_codebooks: int,
                        audio_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(ids known before the first free column of row 0, pattern [rows, max_length]) as
    MusicgenForCausalLM.build_delay_pattern_mask builds them; -1 = free."""
    ids = np.asarray(input_ids, np.int64)
    rows, seq = ids.shape
    k_all = num_codebooks
    d = k_all // audio_channels
    b = rows // k_all
    x = ids.reshape(b, k_all, seq)
    shifted = np.full((b, k_all, max_length), FREE, np.int64)
    if max_length < 2 * d - 1:
        return ids.copy(), shifted.reshape(rows, max_length)
    delay = np.arange(k_all) // audio_channels
    for k in range(k_all):
        n = min(seq, max_length - delay[k])
        shifted[:, k, delay[k]:delay[k] + n] = x[:, k, :n]
    col = np.arange(max_length)[None, :]
    dl = np.arange(d)[:, None]
    forced = (col <= dl) | (col >= max_length - d + 1 + dl)
    forced = np.repeat(forced, audio_channels, axis=0)  # [K, L]
    pattern = np.where(forced[None], pad, shifted).reshape(rows, max_length)
    free0 = np.nonzero(pattern.reshape(b, k_all, max_length)[:, 0, :] == FREE)[1]
    first = int(free0.min()) if free0.size else seq
    return pattern[:, :first].copy(), pattern


def apply_delay_pattern(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    p = pattern[..., :ids.shape[-1]]
    return np.where(p == FREE, ids, p)


def row_delays(rows: int, num_codebooks: int, audio_channels: int) -> np.ndarray:
    return (np.arange(rows) % num_codebooks) // audio_channels


def undelay(delayed: np.ndarray, frames: int, num_codebooks: int, audio_channels: int = 1,
            start: int = 0) -> np.ndarray:
    """Codes [rows, frames] from a delayed sequence whose column 0 is the BOS column: frame t of
    row r sits at column 1 + delay(r) + t. `start` skips frames (a continuation's prompt)."""
    rows = delayed.shape[0]
    out = np.empty((rows, frames), np.int64)
    for r, dl in enumerate(row_delays(rows, num_codebooks, audio_channels)):
        out[r] = delayed[r, 1 + dl + start:1 + dl + start + frames]
    return out


@dataclass
class SamplingParams:
    guidance_scale: float = 3.0
    top_k: int = 250
    temperature: float = 1.0
    do_sample: bool = True


def guide(raw: np.ndarray, scale: float) -> np.ndarray:
    """raw [2N, V] (cond rows, then uncond) -> uncond + (cond - uncond) * scale, float32."""
    raw = np.asarray(raw, np.float32)
    n = raw.shape[0] // 2
    cond, uncond = raw[:n], raw[n:]
    return uncond + (cond - uncond) * np.float32(scale)


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep every score >= the k-th largest of its row (ties kept), the rest -inf."""
    k = min(max(int(k), 1), scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[..., k - 1:k]
    return np.where(scores < kth, np.float32(-np.inf), scores).astype(np.float32)


def process(raw: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The logits processors in transformers' order: CFG, then (sampling only) temperature, top-k."""
    s = guide(raw, p.guidance_scale) if p.guidance_scale != 1.0 else np.asarray(
        raw[:raw.shape[0] // 2], np.float32)
    if not p.do_sample:
        return s
    if p.temperature != 1.0:
        s = (s / np.float32(p.temperature)).astype(np.float32)
    if p.top_k and p.top_k > 0:
        s = top_k_filter(s, p.top_k)
    return s


class TokenSampler:
    """Draws one token per row from processed scores; argmax when not sampling. One numpy
    PCG64 stream per job, so the same seed gives the same tokens for the same logits."""

    def __init__(self, seed: int, do_sample: bool = True):
        self.rng = np.random.Generator(np.random.PCG64(int(seed)))
        self.do_sample = do_sample

    def __call__(self, scores: np.ndarray, raw: np.ndarray | None = None, step: int = 0) -> np.ndarray:
        if not self.do_sample:
            return np.argmax(scores, axis=-1).astype(np.int64)
        s = scores.astype(np.float64)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        cdf = np.cumsum(p, axis=-1)
        u = self.rng.random(s.shape[0]) * cdf[:, -1]
        idx = np.array([np.searchsorted(cdf[i], u[i], side="right") for i in range(s.shape[0])])
        return np.minimum(idx, s.shape[-1] - 1).astype(np.int64)


Choose = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def decode_loop(forward: Callable[[np.ndarray], np.ndarray], prefix: np.ndarray, new_frames: int,
                num_codebooks: int, audio_channels: int, pad: int, params: SamplingParams,
                choose: Choose, on_step: Callable[[int, int], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """Generate `new_frames` frames after `prefix` ([rows, 1 + P]: the BOS column and P prompt
    frames, P >= 0). `forward(ids [2*rows, S])` runs the decoder on the next S columns (cond rows
    then uncond, KV-cached by the caller) and returns the last position's logits [2*rows, V].
    `choose(scores, raw, step)` picks the tokens [rows]. Returns the whole delayed sequence
    [rows, 1 + P + new_frames + D - 1] (pattern applied)."""
    d = num_codebooks // audio_channels
    length = prefix.shape[1] + new_frames + d - 1
    ids, pattern = build_delay_pattern(prefix, pad, length, num_codebooks, audio_channels)
    seq = np.array(pattern)
    cur = ids.shape[1]
    total = length - cur
    feed = ids
    for i, col in enumerate(range(cur, length)):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        raw = np.asarray(forward(np.concatenate([feed, feed])), np.float32)
        tok = choose(process(raw, params), raw, i)
        new = np.where(pattern[:, col] == FREE, tok, pattern[:, col])
        seq[:, col] = new
        feed = new[:, None]
        if on_step is not None:
            on_step(i + 1, total)
    return seq

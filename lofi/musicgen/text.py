"""The T5 prompt tokenizer of a MusicGen checkpoint (its tokenizer.json, via `tokenizers`).

Like MusicgenProcessor(text=..., padding=True): each prompt encoded as the tokenizer.json says
(it appends </s>), right-padded with <pad> to the longest, attention mask 1 = token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError


class MusicgenTokenizer:
    def __init__(self, tokenizer, pad_id: int, max_length: int):
        self.tok = tokenizer
        self.pad_id = pad_id
        self.max_length = max_length

    @classmethod
    def from_checkpoint(cls, root: str | Path) -> "MusicgenTokenizer":
        from tokenizers import Tokenizer
        root = Path(root)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise LofiError(MODEL_NOT_FOUND, f"missing {path} (run `lofi setup musicgen`)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error type is not importable
            raise LofiError(MODEL_LOAD_FAILED, f"malformed {path}: {e}") from e
        tok.no_padding()
        tok.no_truncation()
        cfg = {}
        if (root / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((root / "tokenizer_config.json").read_text())
            except ValueError:
                cfg = {}
        pad = tok.token_to_id(str(cfg.get("pad_token") or "<pad>"))
        max_len = cfg.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, int) and 0 < max_len < 100_000 else 512
        return cls(tok, 0 if pad is None else pad, max_len)

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 [B, L] (right padding)."""
        seqs = [self.tok.encode(p).ids for p in prompts]
        if any(len(s) > self.max_length for s in seqs):
            raise LofiError(INVALID_PARAMS, f"prompt: longer than {self.max_length} tokens",
                            {"field": "prompt"})
        n = max(len(s) for s in seqs)
        ids = np.full((len(seqs), n), self.pad_id, np.int64)
        mask = np.zeros((len(seqs), n), np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        return ids, mask

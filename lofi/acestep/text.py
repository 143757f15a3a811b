"""Prompt tokenizer for the UMT5 text encoder (umt5-base/tokenizer.json). No ML framework here.

Reproduces `AutoTokenizer(umt5-base)(texts, padding=True, truncation=True, max_length=256)`:
SentencePiece-unigram pieces, `</s>` appended, no BOS, truncated so that `</s>` stays last,
right-padded with `<pad>` to the longest prompt of the batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError

TEXT_MAX_LENGTH = 256
TOKENIZER_FILE = Path("umt5-base") / "tokenizer.json"


class PromptTokenizer:
    def __init__(self, tokenizer_json: str | Path):
        path = Path(tokenizer_json)
        if not path.is_file():
            raise LofiError(MODEL_NOT_FOUND, f"missing tokenizer file {path} "
                            f"(run `lofi setup ace-step`)")
        try:
            from tokenizers import Tokenizer
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise LofiError(MODEL_LOAD_FAILED, f"malformed tokenizer file {path}: {e}") from e
        # We append </s> ourselves so truncation can keep it last; so disable the library's own
        # truncation/padding if the file enables them.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.eos_id = self._special_id("</s>", path)
        self.pad_id = self._special_id("<pad>", path)
        # The reference relies on the file's post-processor ("$A </s>") to add </s>. Ours adds it
        # by hand, so make sure the file does exactly that (or nothing) and we never double it.
        probe = "a b"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        if full not in (plain + [self.eos_id], plain):
            raise LofiError(MODEL_LOAD_FAILED,
                            f"{path}: unexpected post-processor (special tokens {full} for {plain}); "
                            f"expected only a trailing </s>")

    @classmethod
    def from_checkpoint(cls, checkpoint_root: str | Path) -> "PromptTokenizer":
        return cls(Path(checkpoint_root) / TOKENIZER_FILE)

    def _special_id(self, token: str, path: Path) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise LofiError(MODEL_LOAD_FAILED, f"{path}: no {token} token in the vocabulary")
        return int(i)

    def ids(self, prompt: str, max_length: int = TEXT_MAX_LENGTH) -> list[int]:
        """Token ids of one prompt, ending with </s>, at most `max_length` long."""
        pieces = self._tok.encode(prompt, add_special_tokens=False).ids
        return pieces[: max_length - 1] + [self.eos_id]

    def encode(self, prompts: list[str], max_length: int = TEXT_MAX_LENGTH
               ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64 [B, Nt], attention_mask int64 [B, Nt]), right-padded to the longest."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise LofiError(INVALID_PARAMS, "prompts must be a non-empty list of strings")
        if max_length < 1:
            raise LofiError(INVALID_PARAMS, f"max_length must be >= 1, got {max_length}")
        rows = [self.ids(p, max_length) for p in prompts]
        n = max(len(r) for r in rows)
        input_ids = np.full((len(rows), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = r
            mask[b, : len(r)] = 1
        return input_ids, mask


# The lyric tokenizer (the reference's VoiceBpeTokenizer + language segmentation) is not ported
# yet; these are its outputs for the lyrics lofi accepts (tests/fixtures/.../lyrics_tokenize.json).
INSTRUMENTAL = "[inst]"
_LYRIC_IDS = {INSTRUMENTAL: [261, 259, 6688, 2]}
LYRICS_ACCEPTED = ("[inst]", "")


def lyric_tokens(lyrics: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [1, N] int64, mask [1, N] int64) as the reference's __call__ builds them: "[inst]"
    (the reference UI's instrumental tag) through the lyric tokenizer with a mask of ones; ""
    as the reference's empty-lyrics path, ids [[0]] with mask [[0]]."""
    if lyrics == "":
        return np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
    ids = _LYRIC_IDS.get(lyrics)
    if ids is None:
        raise LofiError(INVALID_PARAMS, f"lyrics: only {INSTRUMENTAL!r} (instrumental, the default) or "
                        f"'' (the reference's empty-lyrics path) are supported for now, got {lyrics[:40]!r}",
                        {"field": "lyrics", "allowed": list(LYRICS_ACCEPTED)})
    return np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)

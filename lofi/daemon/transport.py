"""Newline-delimited JSON on raw file descriptors: one message per line each way.

stdout belongs to the protocol alone: `claim_stdout` moves the real stdout to a private
descriptor and points fd 1 at stderr, so a stray print or a native library's chatter can never
corrupt the stream.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

MAX_LINE = 1 << 20  # 1 MiB; a generate request is under 2 KiB
_CHUNK = 1 << 16


@dataclass
class Oversized:
    """Stands in for a line longer than the limit; its bytes were discarded as they arrived."""
    size: int


def claim_stdout() -> int:
    """Return a private duplicate of stdout for the protocol; fd 1 and sys.stdout go to stderr."""
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def read_lines(fd: int, max_line: int = MAX_LINE) -> Iterator[bytes | Oversized]:
    """Yield each line (without its newline) until EOF; an over-long line yields Oversized."""
    buf = bytearray()
    skipping = 0  # bytes of an over-long line dropped so far (0: not skipping)
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            if skipping:
                yield Oversized(skipping)
            elif buf.strip():
                yield bytes(buf)
            return
        start = 0
        while start < len(chunk):
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            start = len(chunk) if nl < 0 else nl + 1
            if skipping:
                skipping += len(piece)
            elif len(buf) + len(piece) > max_line:
                skipping = len(buf) + len(piece)
                buf.clear()
            else:
                buf += piece
            if nl >= 0:
                if skipping:
                    yield Oversized(skipping)
                    skipping = 0
                elif buf.strip():
                    yield bytes(buf)
                buf.clear()


_SURROGATE = re.compile("[\ud800-\udfff]")


def encode(obj) -> bytes:
    """One JSON line, always valid UTF-8: a lone UTF-16 surrogate (legal in a Python str, e.g.
    from a request's "\\ud800") becomes U+FFFD, a NaN/Inf float null. Raises only for what is
    not JSON at all (RecursionError, TypeError), which Writer.send turns into an error line."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN/Inf float somewhere: JSON has no spelling for it
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = _SURROGATE.sub("\ufffd", text).encode("utf-8")
    return data + b"\n"


def parse(data: bytes):
    """Strict JSON: UTF-8 only, no NaN/Infinity (nor numbers that overflow to them), and a
    nesting too deep for the parser is a ValueError like any other malformed line."""
    text = data.decode("utf-8")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _unencodable(obj, e: Exception) -> dict:
    """What is sent instead of a message that cannot be JSON: for a response, an error with its
    id (when the id itself is JSON); for a notification, nothing of its content."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(rid, (str, int, float)) or isinstance(rid, bool):
        rid = None
    err = {"code": -32603, "message": f"internal error: the result could not be encoded as JSON "
                                       f"({type(e).__name__})"}
    return {"jsonrpc": "2.0", "id": rid, "error": err}


class Writer:
    """Serialises whole lines from any thread. After the peer goes away every send is a no-op."""

    def __init__(self, fd: int):
        self.fd = fd
        self.closed = False
        self._lock = threading.Lock()

    def send(self, obj) -> bool:
        try:
            data = encode(obj)
        except Exception as e:  # never let one message make the daemon deaf
            data = encode(_unencodable(obj, e))
        with self._lock:
            if self.closed:
                return False
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
            except OSError:
                self.closed = True
                return False
        return True

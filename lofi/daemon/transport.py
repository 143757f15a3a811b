"""Newline-delimited JSON on raw file descriptors: one message per line each way.

stdout belongs to the protocol alone: `claim_stdout` moves the real stdout to a private
descriptor and points fd 1 at stderr, so a stray print or a native library's chatter can never
corrupt the stream.
"""

from __future__ import annotations

import json
import math
import os
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


def encode(obj) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN/Inf float somewhere: JSON has no spelling for it
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class Writer:
    """Serialises whole lines from any thread. After the peer goes away every send is a no-op."""

    def __init__(self, fd: int):
        self.fd = fd
        self.closed = False
        self._lock = threading.Lock()

    def send(self, obj) -> bool:
        data = encode(obj)
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

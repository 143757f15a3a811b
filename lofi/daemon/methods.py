"""JSON-RPC 2.0 dispatch and the method table. Every handler answers at once: generation is
queued for the worker, never run here.

A handler is `fn(daemon, params: dict, call: Call) -> result`, registered with `@method(name,
**spec)` where spec maps each accepted parameter to (types, required). Parameters outside the
spec are refused. `call.after_send(fn)` runs fn once the response has been written, so a
notification about a request (e.g. generation_complete for a cached track) always follows its
response. Another module adds methods the same way, importing `method` from here, or hands a
table of plain `fn(params)` handlers to `add_plain_methods`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Callable

from lofi import __version__
from lofi.errors import (INVALID_DURATION, INVALID_PARAMS, MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED,
                      MODEL_NOT_FOUND, QUEUE_FULL, UNKNOWN_TRACK, LofiError)
from lofi.acestep.tasks import resolve as resolve_task
from lofi.params import SOURCE_TASKS, GenerateParams
from lofi.daemon import backends
from lofi.daemon.cache import CACHE_WRITE_FAILED
from lofi.daemon.jobs import PRIORITIES, Job, cancelled_payload, complete_payload
from lofi.daemon.transport import MAX_LINE, Oversized, parse

log = logging.getLogger("lofi.rpc")

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS_RPC, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)
RPC_CODES = {
    INVALID_PARAMS: INVALID_PARAMS_RPC,
    INVALID_DURATION: INVALID_PARAMS_RPC,
    MODEL_NOT_FOUND: -32001,
    MODEL_LOAD_FAILED: -32002,
    MODEL_INFERENCE_FAILED: -32003,
    QUEUE_FULL: -32004,
    UNKNOWN_TRACK: -32005,
    # raised by the methods other modules add (lofi/playback.py, lofi/hub/setup.py)
    "PLAYBACK_FAILED": -32006,
    "NOT_ENOUGH_DISK": -32007,
    "DOWNLOAD_FAILED": -32008,
    "VERIFY_FAILED": -32009,
    "SETUP_BUSY": -32010,
    CACHE_WRITE_FAILED: -32011,
}


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    @classmethod
    def of(cls, e: LofiError) -> "RpcError":
        return cls(RPC_CODES.get(e.code, INTERNAL_ERROR), e.message, dict(e.data, code=e.code))


def bad_param(name: str, message: str, **extra) -> LofiError:
    return LofiError(INVALID_PARAMS, message, dict(extra, field=name))


@dataclass
class Call:
    deferred: list[Callable[[], None]] = field(default_factory=list)

    def after_send(self, fn: Callable[[], None]) -> None:
        self.deferred.append(fn)


@dataclass
class Method:
    fn: Callable
    spec: dict | None  # None: the handler checks its own parameters


METHODS: dict[str, Method] = {}


def method(name: str, spec: dict | None = None, checks_own_params: bool = False):
    def register(fn):
        METHODS[name] = Method(fn, None if checks_own_params else (spec or {}))
        return fn
    return register


def add_plain_methods(table: dict[str, Callable[[dict], object]]) -> None:
    """Register handlers that take only their params dict and check it themselves, e.g. the
    table filled by `lofi.playback.register(table, daemon.notify)`."""
    for name, fn in table.items():
        METHODS[name] = Method(lambda d, params, call, fn=fn: fn(params), None)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def show(v, limit: int = 60) -> str:
    """A short JSON rendering of a client's value for an error message (never raises)."""
    try:
        return json.dumps(v)[:limit]
    except (RecursionError, ValueError, TypeError):
        return type(v).__name__


def check_params(params: dict, spec: dict) -> dict:
    for k in params:
        if k not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise bad_param(k, f"unknown parameter {k!r} (accepted: {allowed})")
    for k, (types, required) in spec.items():
        if k not in params:
            if required:
                raise bad_param(k, f"missing required parameter {k!r}")
            continue
        v = params[k]
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise bad_param(k, f"{k} must be {want}, got {show(v)}")
    return params


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_text(params: dict) -> None:
    """Every text in params is real Unicode: a lone UTF-16 surrogate ("\\ud800") parses in JSON
    but cannot be tokenized, stored in a sidecar or shown by an editor. Nested values are checked
    where a handler takes them; names and strings at the top are checked here."""
    for k, v in params.items():
        if _has_surrogate(k):
            raise bad_param("params", "a parameter name contains a lone UTF-16 surrogate")
        if isinstance(v, str) and _has_surrogate(v):
            raise bad_param(k, f"{k} contains a lone UTF-16 surrogate (not valid Unicode text)")


# -- the JSON-RPC envelope ---------------------------------------------------------------------

MAX_MESSAGE = 500  # a message quoting a client's huge value stays readable


def _error(rid, code: int, message: str, data: dict | None = None) -> dict:
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    err = {"code": code, "message": message}
    if data:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": err}


def internal_error(e: BaseException) -> dict:
    return _error(None, INTERNAL_ERROR, f"internal error: {type(e).__name__}")


def handle_line(daemon, line) -> tuple[object | None, list[Callable[[], None]]]:
    """One line in -> (the response to write or None, what to run after writing it)."""
    if isinstance(line, Oversized):
        return _error(None, INVALID_REQUEST, f"request line of {line.size} bytes exceeds the "
                      f"{MAX_LINE}-byte limit; it was discarded",
                      {"size_bytes": line.size, "limit_bytes": MAX_LINE}), []
    try:
        msg = parse(line)
    except (UnicodeDecodeError, ValueError) as e:
        return _error(None, PARSE_ERROR, f"parse error: {e}"[:300]), []
    call = Call()
    if isinstance(msg, list):
        if not msg:
            return _error(None, INVALID_REQUEST, "empty batch"), []
        out = [r for r in (_handle_one(daemon, m, call) for m in msg) if r is not None]
        return (out or None), call.deferred
    return _handle_one(daemon, msg, call), call.deferred


def _handle_one(daemon, msg, call: Call) -> dict | None:
    if not isinstance(msg, dict):
        return _error(None, INVALID_REQUEST, "a request must be a JSON object")
    rid = msg.get("id")
    is_notification = "id" not in msg
    if isinstance(rid, bool) or not (rid is None or isinstance(rid, (str, int, float))):
        return _error(None, INVALID_REQUEST, "id must be a string, a number or null")
    if msg.get("jsonrpc", "2.0") != "2.0":
        return _error(rid, INVALID_REQUEST, 'jsonrpc must be "2.0"')
    name = msg.get("method")
    if not isinstance(name, str):
        return _error(rid, INVALID_REQUEST, "method must be a string")
    params = msg.get("params")
    m = METHODS.get(name)
    try:
        if m is None:
            raise RpcError(METHOD_NOT_FOUND, f"unknown method {name!r}", {"methods": sorted(METHODS)})
        if params is None or params == []:  # [] is how Lua encodes an empty table
            params = {}
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS_RPC, "params must be an object of named parameters",
                           {"code": INVALID_PARAMS, "field": "params"})
        _check_text(params)
        if m.spec is not None:
            check_params(params, m.spec)
        result = m.fn(daemon, params, call)
    except RpcError as e:
        resp = _error(rid, e.code, e.message, e.data)
    except LofiError as e:
        e = RpcError.of(e)
        resp = _error(rid, e.code, e.message, e.data)
    except RecursionError:
        resp = _error(rid, INTERNAL_ERROR, "internal error: a value nested too deeply")
    except Exception as e:
        log.exception("method %s failed", name)
        resp = _error(rid, INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}"[:500])
    else:
        resp = {"jsonrpc": "2.0", "id": rid, "result": result}
    return None if is_notification else resp


# -- methods -----------------------------------------------------------------------------------

_GEN_FIELDS = [f for f in GenerateParams.field_names() if not f.endswith("_sha256")]  # ours


_SCALARS = {"str": (str,), "float": (int, float), "int": (int,), "bool": (bool,),
            "int | None": (int, type(None)), "float | None": (int, float, type(None)),
            "str | None": (str, type(None))}
_GEN_TYPES = {f.name: _SCALARS.get(str(f.type)) for f in fields(GenerateParams)}
_GEN_TYPES.update(priority=(str,), backend=(str,))
MAX_TEXT = 10_000  # longer than any accepted value; keeps error messages short


def _check_types(params: dict) -> None:
    """Scalar fields hold scalars of their type before any range check (so a message never
    renders a huge or deeply nested value); fields of other types are left to validate()."""
    for k, v in params.items():
        types = _GEN_TYPES.get(k)
        if types is None:
            continue
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            names = [_TYPE_NAMES.get(t, "null") for t in types if not (t is int and float in types)]
            if k == "duration_sec":
                raise LofiError(INVALID_DURATION, f"duration_sec must be a number of seconds between "
                                f"5 and 240, got {show(v)}", {"field": k})
            raise bad_param(k, f"{k} must be {' or '.join(names)}, got {show(v)}")
        if isinstance(v, str) and len(v) > MAX_TEXT:
            raise bad_param(k, f"{k} is {len(v)} characters long; far more than allowed")


# lofi.nvim's client spells some parameters its own way: accepted as the same thing
PARAM_ALIASES = {"inference_steps": "infer_steps"}


def _unalias(params: dict) -> dict:
    out = dict(params)
    for theirs, ours in PARAM_ALIASES.items():
        if theirs in out:
            v = out.pop(theirs)
            if ours in out and out[ours] != v:
                raise bad_param(theirs, f"{theirs} is another name for {ours}; they differ "
                                f"({show(v)} and {show(out[ours])})")
            out[ours] = v
    seed = out.get("seed")  # Lua has only doubles: an integral float is that integer
    if isinstance(seed, float) and seed.is_integer() and 0 <= seed < 2**64:
        out["seed"] = int(seed)
    return out


@method("generate", checks_own_params=True)
def generate(d, params: dict, call: Call) -> dict:
    from lofi.musicgen.params import MusicgenParams
    fields = _GEN_FIELDS + [f for f in MusicgenParams.field_names() if f not in _GEN_FIELDS]
    accepted = fields + ["priority", "backend"]
    for k in params:
        if k not in accepted and k not in PARAM_ALIASES:
            raise bad_param(k, f"unknown parameter {k!r} (accepted: {', '.join(accepted)}; "
                            f"also {', '.join(PARAM_ALIASES)})")
    params = _unalias(params)
    for k in ("prompt", "duration_sec"):  # source tasks take their length from the source
        if k not in params and not (k == "duration_sec" and params.get("task") in SOURCE_TASKS):
            raise bad_param(k, f"missing required parameter {k!r}")
    _check_types(params)
    priority = params.get("priority", "normal")
    if priority not in PRIORITIES:
        raise bad_param("priority", f"priority must be one of {', '.join(PRIORITIES)}, got {show(priority)}")
    backend = d.backends.check_name(params.get("backend", d.backends.current))
    if backend != "ace-step":  # the cache holds ACE-Step tracks only
        d.backends.require_ready(backend)
    if params.get("task") in SOURCE_TASKS:
        params = dict(params, duration_sec=None)  # the source fixes the length
    # each backend its own request; the other backend's parameters are refused by name
    gp = backends.build_params(backend, {k: params[k] for k in fields if k in params},
                               lambda p: resolve_task(p, d.cache.root, d.settings.home / "lora"))
    if backend == "ace-step":
        from lofi.acestep.lora import refuse_quantized
        refuse_quantized(getattr(gp, "lora", None), d.settings.quantize)
    explicit_seed = gp.seed is not None
    if not explicit_seed:
        gp.seed = secrets.randbits(32)
    engine, precision = d.backends.identity(backend)
    track_id = gp.track_id(engine, precision)
    if explicit_seed:
        track = d.cache.lookup(track_id, touch=True)
        if track is not None:
            call.after_send(lambda: d.notify("generation_complete", complete_payload(track, cached=True)))
            return {"track_id": track_id, "status": "cached", "position": 0, "seed": gp.seed,
                    "backend": backend}
    d.backends.require_ready(backend)
    job = Job(track_id, gp, priority, backend, engine, precision, d.queue.next_seq())
    job, status, position = d.queue.submit(job, d.estimator)
    call.after_send(job.announced.set)
    return {"track_id": track_id, "status": status, "position": position, "seed": gp.seed,
            "backend": job.backend}


@method("cancel", {"track_id": ((str,), False)})
def cancel(d, params: dict, call: Call) -> dict:
    tid = params.get("track_id")
    running, _ = d.queue.snapshot()
    job = running if tid is None else d.queue.find(tid)
    if job is None:
        if tid is None or d.cache.lookup(tid) is not None:  # nothing running / already finished
            return {"track_id": tid, "cancelled": False, "was_running": False}
        raise LofiError(UNKNOWN_TRACK, f"no queued, running or cached track {show(tid)}",
                        {"track_id": tid[:100]})
    with job.lock:
        if job.outcome is not None:
            return {"track_id": job.track_id, "cancelled": False, "was_running": False}
        if d.queue.remove(job):
            call.after_send(lambda: d.finish(job, "cancelled", cancelled_payload(job)))
            return {"track_id": job.track_id, "cancelled": True, "was_running": False}
        job.cancel_requested.set()  # the worker stops at the next step or stage boundary
        return {"track_id": job.track_id, "cancelled": True, "was_running": True}


@method("status")
def status(d, params: dict, call: Call) -> dict:
    running, pending = d.queue.snapshot()
    live = d.worker.live
    engine = live.get("engine")
    if engine is None:
        try:
            engine = d.backends.engine_name()
        except LofiError:
            engine = None
    mem = dict(live.get("memory") or {})
    mem.update(_process_memory())
    return {
        "running": running.view() if running is not None else None,
        "queue": [dict(j.summary(), position=i + (running is not None)) for i, j in enumerate(pending)],
        "queue_size": d.queue.capacity,
        "backend": d.backends.current,
        "engine": engine,
        "device": live.get("device") or d.backends.predicted_device(engine),
        "precision": live.get("precision") or d.settings.precision,
        "loaded": live.get("loaded", []),
        "memory": mem,
        "uptime_sec": round(time.monotonic() - d.started, 3),
        "version": __version__,
    }


def _process_memory() -> dict:
    out = {}
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss"] = peak if sys.platform == "darwin" else peak * 1024  # bytes vs KiB
    except (ImportError, AttributeError):
        pass
    try:
        with open("/proc/self/statm") as fh:
            out["rss"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    return out


@method("get_backends")
def get_backends(d, params: dict, call: Call) -> dict:
    from lofi.settings import BACKENDS
    live = d.worker.live if d.worker.pipeline_backend else None
    from lofi.daemon.backends import NVIM_NAMES
    return {"current": d.backends.current, "default_backend": NVIM_NAMES[d.backends.current],
            "backends": [d.backends.describe(n, live if n == d.worker.pipeline_backend else None)
                         for n in BACKENDS]}


@method("set_backend", {"backend": ((str,), True)})
def set_backend(d, params: dict, call: Call) -> dict:
    name = d.backends.check_name(params["backend"])
    state, message, _ = d.backends.state(name)
    if name == "musicgen" and state == "not_installed":  # nothing to switch to before its setup
        raise LofiError(MODEL_NOT_FOUND, message, {"backend": name, "state": state})
    previous, d.backends.current = d.backends.current, name
    if previous != name:
        d.worker.release_requested.set()  # the worker drops the other backend's models when idle
        log.info("backend %s -> %s", previous, name)
    return {"backend": name, "previous": previous, "state": state, "message": message}


@method("cache_list")
def cache_list(d, params: dict, call: Call) -> dict:
    return {"tracks": [t.public() for t in d.cache.tracks()]}


@method("cache_delete", {"track_id": ((str,), True)})
def cache_delete(d, params: dict, call: Call) -> dict:
    tid = params["track_id"]
    freed = d.cache.delete(tid)
    if freed is None:
        raise LofiError(UNKNOWN_TRACK, f"no cached track {show(tid)}", {"track_id": tid[:100]})
    return {"track_id": tid, "deleted": True, "bytes_freed": freed}


@method("cache_clear")
def cache_clear(d, params: dict, call: Call) -> dict:
    n, freed = d.cache.clear()
    return {"deleted": n, "bytes_freed": freed}


@method("cache_stats")
def cache_stats(d, params: dict, call: Call) -> dict:
    return d.cache.stats()


@method("ping")
def ping(d, params: dict, call: Call) -> dict:
    return {"version": __version__, "uptime_sec": round(time.monotonic() - d.started, 3),
            "pid": os.getpid()}


@method("shutdown")
def shutdown(d, params: dict, call: Call) -> dict:
    call.after_send(lambda: d.request_stop("shutdown request"))
    return {"ok": True}


# Playback (lofi/playback.py): play, pause, resume, stop, volume, playback_status.
from lofi.playback import install as _install_playback  # noqa: E402

_install_playback(method)

# Model setup (lofi/daemon/setup.py): setup, with download_progress notifications.
from lofi.daemon.setup import register as _register_setup  # noqa: E402

_register_setup(method)

# The radio (lofi/daemon/radio.py): radio_start, radio_stop, radio_skip, radio_status, radio_keep.
from lofi.daemon.radio import register as _register_radio  # noqa: E402

_register_radio(method)

"""The daemon method `setup` {backend, dry_run?, revision?, precision?, keep_original?, quantize?}.

quantize: 8 | 4 | null, bits of the converted DiT's weights; default: the daemon's LOFI_QUANTIZE.

dry_run: answers the plan at once (Plan.summary(): total_bytes, download_bytes, free_bytes,
needed_bytes, enough_disk, files_to_download, files_changed, files_to_verify, convert, ... and
the current state / state_detail), so the editor can show it and ask. Otherwise the setup
starts on its own thread after the response and reports through notifications:
  download_progress {backend, stage: downloading|verifying|converting, file, bytes_done,
                     bytes_total, overall_percent}     at most 4 a second, plus each file's ends
  setup_complete    {backend, state: "ready", revision, downloaded, repaired, converted, removed,
                     notes}
  setup_error       {backend, code, message, data}
A setup already running answers {started: false, running: true} with its progress. Only one
setup runs per checkpoint folder, across processes (CLI and daemons share a lock).
"""

from __future__ import annotations

import logging
import threading

from lofi.errors import INVALID_PARAMS, MODEL_NOT_FOUND, LofiError

log = logging.getLogger("lofi.setup")

SPEC = {
    "backend": ((str,), True),
    "dry_run": ((bool,), False),
    "revision": ((str,), False),
    "precision": ((str,), False),
    "keep_original": ((bool,), False),
    "quantize": ((int, type(None)), False),
}

_lock = threading.Lock()
_running: dict[str, threading.Thread] = {}


def _check(params: dict) -> None:
    backend = params["backend"]
    if backend == "musicgen":
        raise LofiError(MODEL_NOT_FOUND, "MusicGen is not part of this product; set up ace-step",
                        {"field": "backend", "allowed": ["ace-step"]})
    if backend != "ace-step":
        raise LofiError(INVALID_PARAMS, f"backend must be ace-step, got {backend!r}",
                        {"field": "backend", "allowed": ["ace-step"]})
    if params.get("precision", "fp16") not in ("fp16", "fp32"):
        raise LofiError(INVALID_PARAMS, f"precision must be fp16 or fp32, got {params['precision']!r}",
                        {"field": "precision", "allowed": ["fp16", "fp32"]})
    q = params.get("quantize")
    if q is not None and (isinstance(q, bool) or q not in (8, 4)):
        raise LofiError(INVALID_PARAMS, f"quantize must be 8, 4 or null, got {q!r}",
                        {"field": "quantize", "allowed": [8, 4, None]})


def _engine(d) -> str:
    try:
        return d.backends.engine_name()
    except LofiError:
        return "none"  # no engine installed: download and verify only


def handle_setup(d, params: dict, call) -> dict:
    """Handler for the daemon's method table: fn(daemon, params, call) -> result."""
    from lofi.hub import setup

    _check(params)
    home = d.settings.home
    root = setup.checkpoint_root(home)
    kwargs = dict(revision=params.get("revision"), precision=params.get("precision", "fp16"),
                  engine=_engine(d), keep_original=params.get("keep_original"),
                  quantize=params.get("quantize", d.settings.quantize))
    if params.get("dry_run"):
        plan = setup.plan_setup(home, **kwargs)
        st = setup.backend_state(home, kwargs["engine"])
        return dict(plan.summary(), state=st["state"], state_detail=st.get("detail"))
    key = str(root)
    with _lock:
        t = _running.get(key)
        if (t is not None and t.is_alive()) or setup.setup_running(root):
            return {"backend": "ace-step", "started": False, "running": True,
                    "state": setup.backend_state(home, kwargs["engine"])}
        t = threading.Thread(target=_run, args=(d, home, kwargs), name="lofi-setup", daemon=True)
        _running[key] = t
    call.after_send(t.start)  # notifications follow the response
    return {"backend": "ace-step", "started": True, "path": str(root)}


def _run(d, home, kwargs: dict) -> None:
    from lofi.hub import setup
    try:
        result = setup.run_setup(home, on_progress=lambda ev: d.notify("download_progress", ev),
                                 on_notice=lambda m: log.warning("setup: %s", m), **kwargs)
    except LofiError as e:
        log.error("setup failed: [%s] %s", e.code, e.message)
        d.notify("setup_error", {"backend": "ace-step", "code": e.code, "message": e.message,
                                 "data": e.data})
    except Exception as e:  # noqa: a failing setup never takes the daemon down
        log.exception("setup failed")
        d.notify("setup_error", {"backend": "ace-step", "code": "INTERNAL_ERROR",
                                 "message": f"{type(e).__name__}: {e}", "data": {}})
    else:
        worker = getattr(d, "worker", None)
        if worker is not None:
            worker.release_requested.set()  # drop networks loaded from the files just replaced
        d.notify("setup_complete", result.as_dict())


def register(method) -> None:
    """Add `setup` to a method table through its decorator (lofi.daemon.methods.method)."""
    method("setup", SPEC)(handle_setup)

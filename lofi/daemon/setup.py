"""The daemon method `setup` {backend, dry_run?, revision?, precision?, keep_original?,
accept_license?, quantize?}. MusicGen's weights are CC-BY-NC-4.0: its dry run answers the licence, its
model card and whether it was accepted; the setup itself needs accept_license: true once.

quantize (ace-step): 8 | 4 | null, bits of the converted DiT's weights; default: the daemon's
LOFI_QUANTIZE.

dry_run: answers the plan at once (Plan.summary(): total_bytes, download_bytes, free_bytes,
needed_bytes, enough_disk, files_to_download, files_changed, files_to_verify, convert, ... and
the current state / state_detail), so the editor can show it and ask. Otherwise the setup
starts on its own thread after the response and reports through notifications:
  download_progress {backend, stage: downloading|verifying|converting, file, bytes_done,
                     bytes_total, overall_percent}     at most 4 a second, plus each file's ends
  setup_complete    {backend, state: "ready", revision, downloaded, repaired, converted, removed,
                     notes}
  setup_error       {backend, code, message, data}  (also when downloaded but the engine cannot
                     run: MODEL_LOAD_FAILED, the message names what is missing)
A setup already running answers {started: false, running: true} with its progress. Only one
setup runs per checkpoint folder, across processes (CLI and daemons share a lock).
"""

from __future__ import annotations

import logging
import threading

from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, LofiError

log = logging.getLogger("lofi.setup")

SPEC = {
    "backend": ((str,), True),
    "dry_run": ((bool,), False),
    "revision": ((str,), False),
    "precision": ((str,), False),
    "keep_original": ((bool,), False),
    "accept_license": ((bool,), False),  # musicgen: the weights' CC-BY-NC-4.0 licence
    "quantize": ((int, type(None)), False),
}

_lock = threading.Lock()
_running: dict[str, threading.Thread] = {}


def _check(params: dict) -> None:
    backend = params["backend"]
    if backend not in ("ace-step", "musicgen"):
        raise LofiError(INVALID_PARAMS, f"backend must be ace-step or musicgen, got {backend!r}",
                        {"field": "backend", "allowed": ["ace-step", "musicgen"]})
    if params.get("precision", "auto") not in ("auto", "bf16", "fp16", "fp32"):
        raise LofiError(INVALID_PARAMS, f"precision must be auto, bf16, fp16 or fp32, got "
                        f"{params['precision']!r}",
                        {"field": "precision", "allowed": ["auto", "bf16", "fp16", "fp32"]})
    q = params.get("quantize")
    if q is not None and (isinstance(q, bool) or q not in (8, 4)):
        raise LofiError(INVALID_PARAMS, f"quantize must be 8, 4 or null, got {q!r}",
                        {"field": "quantize", "allowed": [8, 4, None]})
    if q is not None and backend != "ace-step":
        raise LofiError(INVALID_PARAMS, f"quantize: an ACE-Step DiT option, not for {backend}",
                        {"field": "quantize"})


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
    backend = params["backend"]
    spec, licence = setup.ACE_STEP, {}
    if backend == "musicgen":
        from lofi.musicgen import hub as mg
        spec = mg.spec()
    root = setup.checkpoint_root(home, spec)
    kwargs = dict(revision=params.get("revision"), precision=params.get("precision", "auto"),
                  engine="none" if backend == "musicgen" else _engine(d),
                  keep_original=params.get("keep_original"), spec=spec,
                  quantize=params.get("quantize", d.settings.quantize) if backend == "ace-step" else None)
    if spec.license is not None:
        licence = {"license": spec.license[0], "license_url": spec.license[1],
                   "model_card": f"https://huggingface.co/{spec.repo_id}",
                   "license_accepted": mg.license_accepted(root)}
    if params.get("dry_run"):
        plan = setup.plan_setup(home, **kwargs)
        st = setup.backend_state(home, kwargs["engine"], spec)
        return dict(plan.summary(), state=st["state"], state_detail=st.get("detail"), **licence)
    if licence and not licence["license_accepted"]:
        if not params.get("accept_license"):
            raise LofiError(INVALID_PARAMS, f"the {spec.title} weights are licensed {licence['license']} "
                            f"(non-commercial use only; {licence['license_url']}, model card "
                            f"{licence['model_card']}): pass accept_license: true to accept it",
                            dict(licence, field="accept_license"))
        mg.accept_license(root, spec)
    key = str(root)
    with _lock:
        t = _running.get(key)
        if (t is not None and t.is_alive()) or setup.setup_running(root):
            return {"backend": backend, "started": False, "running": True,
                    "state": setup.backend_state(home, kwargs["engine"], spec)}
        t = threading.Thread(target=_run, args=(d, home, kwargs), name="lofi-setup", daemon=True)
        _running[key] = t
    call.after_send(t.start)  # notifications follow the response
    return {"backend": backend, "started": True, "path": str(root)}


def _run(d, home, kwargs: dict) -> None:
    from lofi.hub import setup
    try:
        result = setup.run_setup(home, on_progress=lambda ev: d.notify("download_progress", ev),
                                 on_notice=lambda m: log.warning("setup: %s", m), **kwargs)
    except LofiError as e:
        log.error("setup failed: [%s] %s", e.code, e.message)
        d.notify("setup_error", {"backend": kwargs["spec"].backend, "code": e.code,
                                 "message": e.message, "data": e.data})
    except Exception as e:  # noqa: a failing setup never takes the daemon down
        log.exception("setup failed")
        d.notify("setup_error", {"backend": kwargs["spec"].backend, "code": "INTERNAL_ERROR",
                                 "message": f"{type(e).__name__}: {e}", "data": {}})
    else:
        worker = getattr(d, "worker", None)
        if worker is not None:
            worker.release_requested.set()  # drop networks loaded from the files just replaced
        if result.state != "ready":  # downloaded, but the engine cannot run: say what is missing
            d.notify("setup_error", {"backend": kwargs["spec"].backend, "code": MODEL_LOAD_FAILED,
                                     "message": "downloaded and verified, but not ready to generate: "
                                     + "; ".join(result.notes), "data": result.as_dict()})
            return
        d.notify("setup_complete", result.as_dict())


def register(method) -> None:
    """Add `setup` to a method table through its decorator (lofi.daemon.methods.method)."""
    method("setup", SPEC)(handle_setup)

"""What each backend is, whether it can run here, and how its pipeline is opened.

"ace-step" (the default) and "musicgen" each have a checkpoint under `$LOFI_HOME/<backend>/` and
the record `lofi setup` keeps of it. Nothing here imports an ML framework; `open_pipeline` does,
on the worker thread, when the first job of a backend runs.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

from lofi import MODEL_VERSION
from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError
from lofi.params import MAX_DURATION, MIN_DURATION, SAMPLE_RATE, GenerateParams
from lofi.settings import BACKENDS, Settings, backend_name

# lofi.nvim's client reads `type` (its spelling of the name) and `status` from get_backends
NVIM_NAMES = {"ace-step": "ace_step", "musicgen": "musicgen"}
NVIM_STATUS = {"ready": "ready", "not_installed": "not_installed", "downloading": "downloading",
               "converting": "downloading", "damaged": "error"}


def checkpoint_dir(settings: Settings, backend: str = "ace-step") -> Path:
    return settings.checkpoint_dir if backend == "ace-step" else settings.home / backend


def model_id(checkpoint: Path, backend: str = "ace-step") -> str:
    """The model version plus a digest of the networks' configs: a checkpoint of another size
    (the tests' tiny one) runs at other speeds and must not share progress estimates."""
    h = hashlib.sha256()
    if backend == "musicgen":
        h.update(b"musicgen")
    subs = (".",) if backend == "musicgen" else (
        "ace_step_transformer", "music_dcae_f8c8", "music_vocoder", "umt5-base")
    for sub in subs:
        try:
            h.update((Path(checkpoint) / sub / "config.json").read_bytes()[:1 << 20])
        except OSError:
            pass
    return f"{MODEL_VERSION}-{h.hexdigest()[:8]}"


def open_pipeline(settings: Settings, backend: str = "ace-step"):
    """Create the engine and the pipeline (lazy: networks load when their stage first runs)."""
    from lofi.engines import create_engine
    if backend == "musicgen":
        from lofi.musicgen.pipeline import MusicgenPipeline
        root = checkpoint_dir(settings, backend)
        engine = create_engine(root, settings.engine, settings.precision, settings.device,
                               settings.threads, settings.keep_loaded, backend="musicgen")
        return MusicgenPipeline(root, engine)
    from lofi.acestep.pipeline import Pipeline

    engine = create_engine(settings.checkpoint_dir, settings.engine, settings.precision,
                           settings.device, settings.threads, settings.keep_loaded,
                           quantize=settings.quantize)
    return Pipeline(settings.checkpoint_dir, engine)


def build_params(backend: str, given: dict, resolve=None):
    """The validated request of `backend` from the generate call's fields; the other backend's
    own parameters are INVALID_PARAMS naming them. `resolve` completes an ACE-Step request
    (source file, repaint window, LoRA) before its numbers are normalised."""
    from lofi.musicgen.params import MusicgenParams, refuse_foreign
    refuse_foreign(backend, given)
    if backend == "musicgen":
        p = MusicgenParams(**given).validate()
        for k in ("duration_sec", "guidance_scale", "temperature"):
            if getattr(p, k) is not None:
                setattr(p, k, float(getattr(p, k)))
        return p
    p = GenerateParams(**given).validate()
    if resolve is not None:
        resolve(p)
    for k in GenerateParams.field_names():  # 15 and 15.0 are the same track
        if isinstance(getattr(GenerateParams, k, None), float) or k == "duration_sec":
            setattr(p, k, float(getattr(p, k)))
    return p

class Backends:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.current = settings.backend

    def check_name(self, name) -> str:
        """Our name of a backend (lofi.nvim's `ace_step` is `ace-step`); INVALID_PARAMS otherwise."""
        ours = backend_name(name)
        if ours is None:
            raise LofiError(INVALID_PARAMS, f"backend must be one of {', '.join(BACKENDS)}, got "
                            f"{str(name)[:60]!r}", {"field": "backend", "allowed": list(BACKENDS)})
        return ours

    def state(self, name: str) -> tuple[str, str | None, dict]:
        """(ready | not_installed | downloading | converting | damaged, a message a person can act
        on, details such as the setup's percent). The checkpoint's own record of its setup decides
        (lofi.hub.setup.backend_state: sizes and mtimes only, cheap enough for every request)."""
        if name == "musicgen":
            return self._musicgen_state()
        try:
            engine = self.engine_name()
        except LofiError:
            engine = "none"
        return self._setup_state("ace-step", "ACE-Step", engine, None, "")

    def _musicgen_state(self) -> tuple[str, str | None, dict]:
        from lofi.musicgen.hub import MUSICGEN
        return self._setup_state("musicgen", "MusicGen", "none", MUSICGEN,
                                 "; its weights are CC-BY-NC-4.0")

    def _setup_state(self, name: str, title: str, engine: str, spec, note: str):
        from lofi.hub.setup import backend_state
        st = dict(backend_state(self.settings.home, engine, spec) if spec is not None
                  else backend_state(self.settings.home, engine))
        state = st.pop("state")
        if state == "not_installed":
            message = (f"{title} is not installed in {checkpoint_dir(self.settings, name)}: run "
                       f"`lofi setup {name}` (or `:Lofi setup {name}`){note}")
        elif state in ("downloading", "converting"):
            message = (f"{title} is being set up ({state}, {st.get('percent', 0.0):.0f}%); "
                       "generate once setup is complete")
        else:
            message = st.pop("detail", None)
        return state, message, st

    def require_ready(self, name: str) -> None:
        state, message, _ = self.state(name)
        if state == "ready":
            return
        code = MODEL_LOAD_FAILED if state == "damaged" else MODEL_NOT_FOUND
        raise LofiError(code, message, {"backend": name, "state": state})

    def engine_name(self, backend: str = "ace-step") -> str:
        """The engine a job will run on: what track ids are computed with."""
        if self.settings.engine != "auto":
            return self.settings.engine
        from lofi.engines import default_engine  # find_spec (and a one-time CUDA probe) only
        return default_engine(self.settings.device, checkpoint_dir(self.settings, backend), backend)

    def identity(self, backend: str = "ace-step") -> tuple[str, str]:
        """(engine, precision) as track ids see them; quantized DiT weights change the audio, so
        they count as a precision of their own ("fp32+q8")."""
        engine = self.engine_name(backend)
        q = self.settings.quantize if backend == "ace-step" else None
        return engine, self._precision(engine) + (f"+q{q}" if q else "")

    def _precision(self, engine: str | None) -> str:
        """The precision a job will run at (`auto` resolved for the predicted device)."""
        from lofi.engines import resolve_precision
        if engine is None:
            return self.settings.precision
        return resolve_precision(engine, self.settings.precision, self.predicted_device(engine))

    def predicted_device(self, engine: str | None) -> str:
        if self.settings.device != "auto" or engine != "mlx":
            return self.settings.device
        return "gpu" if sys.platform == "darwin" and platform.machine() == "arm64" else "cpu"

    def describe(self, name: str, live: dict | None = None) -> dict:
        """One backend for get_backends; `live` is what the worker's engine reports, if it exists."""
        state, message, detail = self.state(name)
        base = dict(detail, name=name, state=state, message=message, current=name == self.current,
                    type=NVIM_NAMES[name], status=NVIM_STATUS.get(state, "error"))
        if name == "musicgen":
            return self._describe_musicgen(base, live or {})
        try:
            engine, engine_message = self.engine_name(), None
        except LofiError as e:
            engine, engine_message = None, e.message
        live = live or {}
        from lofi.engines import available_engines
        return dict(base, min_duration_sec=int(MIN_DURATION), max_duration_sec=int(MAX_DURATION),
                    sample_rate=SAMPLE_RATE, model_version=MODEL_VERSION,
                    engine=live.get("engine") or engine,
                    device=live.get("device") or self.predicted_device(engine),
                    precision=live.get("precision") or self._precision(engine),
                    engine_message=engine_message, engines=available_engines(self.settings.checkpoint_dir),
                    path=str(self.settings.checkpoint_dir))

    def _describe_musicgen(self, base: dict, live: dict) -> dict:
        from lofi.engines import available_engines
        from lofi.musicgen.params import MAX_DURATION as MG_MAX, MIN_DURATION as MG_MIN
        from lofi.musicgen.windows import CONTEXT_SEC, WINDOW_SEC
        root = checkpoint_dir(self.settings, "musicgen")
        try:
            engine, engine_message = self.engine_name("musicgen"), None
        except LofiError as e:
            engine, engine_message = None, e.message
        version = None
        if base["state"] == "ready":
            from lofi.musicgen.configs import load_config
            from lofi.musicgen.pipeline import model_version
            try:
                version = model_version(load_config(root))
            except LofiError:
                version = None
        return dict(base, min_duration_sec=int(MG_MIN), max_duration_sec=int(MG_MAX),
                    sample_rate=SAMPLE_RATE, model_version=version,
                    engine=live.get("engine") or engine,
                    device=live.get("device") or self.predicted_device(engine),
                    precision=live.get("precision") or self._precision(engine),
                    engine_message=engine_message,
                    engines=available_engines(root, "musicgen"), path=str(root),
                    window_sec=WINDOW_SEC, context_sec=CONTEXT_SEC, license="CC-BY-NC-4.0")

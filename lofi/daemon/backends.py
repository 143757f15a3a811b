"""What each backend is, whether it can run here, and how its pipeline is opened.

"ace-step" is this product's model; its state comes from the checkpoint under
`$LOFI_HOME/ace-step/` and the record `lofi setup` keeps of it. "musicgen" is named by the user's feature document but not part of this
product: it is reported honestly as not installed so the editor can say so. Nothing here imports
an ML framework; `open_pipeline` does, on the worker thread, when the first job runs.
"""

from __future__ import annotations

import platform
import sys

from lofi import MODEL_VERSION
from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError
from lofi.params import MAX_DURATION, MIN_DURATION, SAMPLE_RATE
from lofi.settings import BACKENDS, Settings

MUSICGEN_MESSAGE = ("MusicGen is not part of this product: lofi generates with ACE-Step "
                    "(up to 240 s per track). Use the ace-step backend.")


def open_pipeline(settings: Settings):
    """Create the engine and the pipeline (lazy: networks load when their stage first runs)."""
    from lofi.engines import create_engine
    from lofi.acestep.pipeline import Pipeline

    engine = create_engine(settings.checkpoint_dir, settings.engine, settings.precision,
                           settings.device, settings.threads, settings.keep_loaded,
                           quantize=settings.quantize)
    return Pipeline(settings.checkpoint_dir, engine)


class Backends:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.current = settings.backend

    def check_name(self, name) -> str:
        if not isinstance(name, str) or name not in BACKENDS:
            raise LofiError(INVALID_PARAMS, f"backend must be one of {', '.join(BACKENDS)}, got {name!r}",
                            {"field": "backend", "allowed": list(BACKENDS)})
        return name

    def state(self, name: str) -> tuple[str, str | None, dict]:
        """(ready | not_installed | downloading | converting | damaged, a message a person can act
        on, details such as the setup's percent). The checkpoint's own record of its setup decides
        (lofi.hub.setup.backend_state: sizes and mtimes only, cheap enough for every request)."""
        if name == "musicgen":
            return "not_installed", MUSICGEN_MESSAGE, {}
        from lofi.hub.setup import backend_state
        try:
            engine = self.engine_name()
        except LofiError:
            engine = "none"
        st = dict(backend_state(self.settings.home, engine))
        state = st.pop("state")
        if state == "not_installed":
            message = (f"ACE-Step is not installed in {self.settings.checkpoint_dir}: "
                       "run `lofi setup ace-step` (or `:Lofi setup ace-step`)")
        elif state in ("downloading", "converting"):
            message = (f"ACE-Step is being set up ({state}, {st.get('percent', 0.0):.0f}%); "
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

    def engine_name(self) -> str:
        """The engine a job will run on: what track ids are computed with."""
        if self.settings.engine != "auto":
            return self.settings.engine
        from lofi.engines import default_engine  # find_spec (and a one-time CUDA probe) only
        return default_engine(self.settings.device, self.settings.checkpoint_dir)

    def identity(self) -> tuple[str, str]:
        """(engine, precision) as track ids see them; quantized weights change the audio, so
        they count as a precision of their own ("fp32+q8")."""
        q = self.settings.quantize
        return self.engine_name(), self.settings.precision + (f"+q{q}" if q else "")

    def predicted_device(self, engine: str | None) -> str:
        if self.settings.device != "auto" or engine != "mlx":
            return self.settings.device
        return "gpu" if sys.platform == "darwin" and platform.machine() == "arm64" else "cpu"

    def describe(self, name: str, live: dict | None = None) -> dict:
        """One backend for get_backends; `live` is what the worker's engine reports, if it exists."""
        state, message, detail = self.state(name)
        base = dict(detail, name=name, state=state, message=message, current=name == self.current)
        if name == "musicgen":
            return dict(base, min_duration_sec=None, max_duration_sec=30.0, sample_rate=None,
                        model_version=None, engine=None, device=None, precision=None, path=None)
        try:
            engine, engine_message = self.engine_name(), None
        except LofiError as e:
            engine, engine_message = None, e.message
        live = live or {}
        from lofi.engines import available_engines
        return dict(base, min_duration_sec=MIN_DURATION, max_duration_sec=MAX_DURATION,
                    sample_rate=SAMPLE_RATE, model_version=MODEL_VERSION,
                    engine=live.get("engine") or engine,
                    device=live.get("device") or self.predicted_device(engine),
                    precision=live.get("precision") or self.settings.precision,
                    engine_message=engine_message, engines=available_engines(self.settings.checkpoint_dir),
                    path=str(self.settings.checkpoint_dir))

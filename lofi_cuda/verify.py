"""`python -m lofi_cuda.verify GOLDEN_DIR`: the ONNX engine against a reference golden set.

The same contract and code as `lofi.verify` (every golden in the set's manifest, one line
per check with its error and tolerance, exit 0 only if all pass), driving the ONNX engine.
The model family comes from the manifest: a MusicGen set (transformers' Musicgen classes) runs
lofi.musicgen.verify's checks on MusicgenONNXEngine, one engine per checkpoint of the set.
Options: --precision fp32|fp16, --device auto|cpu|gpu, --only PREFIX...
"""

import argparse
import json
import sys
import time
from pathlib import Path

from lofi.checkpoint import load_safetensors
from lofi.verify import TOLERANCES, Context, Report
from lofi.verify import main as _main
from lofi.verify import run  # noqa: F401  (re-exported for callers and tests)


class _MusicgenContext(Context):
    def __init__(self, golden_dir: Path, engine, factory):
        super().__init__(golden_dir, engine)
        self._factory, self._others = factory, {}

    def engine_for(self, checkpoint: Path):
        if Path(checkpoint) == Path(self.checkpoint):
            return self.engine
        if checkpoint not in self._others:
            self._others[checkpoint] = self._factory(checkpoint)
        return self._others[checkpoint]


def is_musicgen_set(golden_dir: Path) -> bool:
    from lofi.musicgen.verify import is_musicgen_manifest
    return is_musicgen_manifest(json.loads((Path(golden_dir) / "manifest.json").read_text()))


def run_musicgen(golden_dir, engine, factory, out=None, only=None) -> Report:
    """Every MusicGen golden of the set; `factory(checkpoint)` makes the engine of another
    checkpoint of the set (checkpoint_stereo/)."""
    from lofi.musicgen.verify import CHECKERS
    golden_dir = Path(golden_dir)
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    rep = Report(engine.precision, out or sys.stdout)
    ctx = _MusicgenContext(golden_dir, engine, factory)
    for fname, entry in manifest["files"].items():
        stem = fname.rsplit(".", 1)[0]
        if (only and not any(stem.startswith(o) for o in only)) or not fname.endswith(".safetensors") \
                or "/" in fname:
            continue
        checker = next((fn for prefix, fn in CHECKERS if stem.startswith(prefix)), None)
        if checker is None:
            rep.fail(stem, "no checker for this kind of golden")
            continue
        try:
            checker(ctx, stem, entry, load_safetensors(golden_dir / fname), rep)
        except Exception as ex:  # a crash in one golden must not hide the others
            rep.fail(stem, f"{type(ex).__name__}: {ex}")
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lofi_cuda.verify",
                                 description="Check the ONNX engine against a reference golden set.")
    ap.add_argument("golden_dir", type=Path)
    ap.add_argument("--precision", default="fp32", choices=sorted(TOLERANCES))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--only", nargs="*", help="golden name prefixes to run")
    args = ap.parse_args(argv)
    if not (args.golden_dir / "manifest.json").is_file() or not is_musicgen_set(args.golden_dir):
        return _main(argv, engine_name="onnx")
    from lofi.engines import create_engine

    def factory(ckpt):
        return create_engine(ckpt, "onnx", args.precision, args.device, keep_loaded=True,
                             backend="musicgen")

    engine = factory(args.golden_dir / "checkpoint")
    t0 = time.perf_counter()
    rep = run_musicgen(args.golden_dir, engine, factory, only=args.only)
    n_fail = sum(not r[3] for r in rep.rows)
    print(f"{len(rep.rows) - n_fail} passed, {n_fail} failed (musicgen, "
          f"{engine.name}/{engine.device}/{engine.precision}, {time.perf_counter() - t0:.1f} s)")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())

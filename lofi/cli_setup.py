"""`lofi setup ace-step|musicgen`: show what will be downloaded and the free disk, ask, then
download, verify and convert with a progress bar on stderr. `--yes` answers for scripts.
MusicGen's weights are CC-BY-NC-4.0: its setup also needs `--accept-license` or a yes to the
licence prompt, once (the setup state remembers it); the MLX engine reads them unconverted."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lofi.errors import LofiError


def add_setup_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("setup", help="download, verify and convert a model (once)",
                              description="Download ACE-Step v1 or MusicGen from the Hugging Face Hub (honours "
                              "HF_ENDPOINT, HF_TOKEN and the other HF_* variables), verify every file "
                              "against the Hub's size and hash, and convert it for the engine. An "
                              "interrupted download resumes; damaged files are fetched again.")
    s.add_argument("backend", choices=("ace-step", "musicgen"), help="the model to set up")
    s.add_argument("--yes", "-y", action="store_true", help="do not ask before downloading")
    s.add_argument("--accept-license", action="store_true",
                   help="musicgen: accept the weights' CC-BY-NC-4.0 licence without the prompt")
    s.add_argument("--revision", default=None,
                   help="Hub revision (commit, tag or branch); default: the pinned commit "
                        "[LOFI_ACE_STEP_REVISION, LOFI_MUSICGEN_REVISION]")
    s.add_argument("--keep-original", dest="keep_original", action=argparse.BooleanOptionalAction,
                   default=None, help="keep the Hugging Face weight files after conversion "
                   "(default: keep, unless an earlier setup removed them)")
    s.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="precision of the converted MLX weights and of the ONNX graphs on a GPU (auto: bf16 for MLX, fp16 graphs on CUDA; CPUs run fp32 graphs)")
    s.add_argument("--quantize", type=int, choices=(8, 4), default=None,
                   help="ace-step: store the DiT with quantized weights, bits per weight (MLX: 8 "
                        "or 4; ONNX Runtime: 8); less memory, a measured small error (default: none)")
    s.add_argument("--engine", choices=("auto", "mlx", "onnx", "none"),
                   default=os.environ.get("LOFI_ENGINE", "auto"),
                   help="convert for this engine; none: download and verify only [LOFI_ENGINE]")
    s.add_argument("--home", type=Path, default=None, help="LOFI_HOME (default: the platform cache "
                   "folder + lofi.nvim) [LOFI_HOME]")
    s.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_setup)
    return s


def _engine(name: str) -> str:
    if name != "auto":
        return name
    from lofi.engines import default_engine
    try:
        return default_engine()
    except LofiError:
        return "none"


def describe_plan(plan) -> str:
    from lofi.hub.setup import human
    r = plan.remote
    title = "ACE-Step v1 3.5B" if plan.spec.backend == "ace-step" else plan.spec.title
    lines = [f"{title}: {r.repo} @ {r.commit[:12]} from {r.endpoint}",
             f"  into {plan.root}",
             f"  total size: {human(plan.total_bytes)} in {len(r.files)} files"]
    if plan.missing:
        resume = f", resuming with {human(plan.resume_bytes)} already fetched" if plan.resume_bytes else ""
        changed = f", {len(plan.outdated)} changed in this revision" if plan.outdated else ""
        lines.append(f"  to download: {human(plan.download_bytes)} in {len(plan.missing)} files"
                     f"{changed}{resume}")
    if plan.unverified:
        lines.append(f"  to verify: {len(plan.unverified)} files already on disk")
    if plan.convert_components:
        q = f", {plan.quantize}-bit DiT" if plan.quantize else ""
        lines.append(f"  to convert for MLX ({plan.precision}{q}): {', '.join(plan.convert_components)}, "
                     f"up to {human(plan.convert_bytes)}")
    lines.append(f"  free disk: {human(plan.free_bytes)} (needs {human(plan.needed_bytes)})")
    return "\n".join(lines)


class SetupBar:
    """One line on a terminal; otherwise a line per file and stage."""

    def __init__(self, stream=sys.stderr, enabled: bool = True):
        self.stream, self.enabled = stream, enabled
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.monotonic()
        self.seen: dict[str, int] = {}
        self.fetched = 0
        self.last_key = None

    def __call__(self, ev: dict) -> None:
        from lofi.hub.setup import human
        if not self.enabled:
            return
        stage, file, done, total = ev["stage"], ev["file"], ev["bytes_done"], ev["bytes_total"]
        if stage == "downloading":
            self.fetched += max(0, done - self.seen.get(file, 0))
            self.seen[file] = done
        pct = ev["overall_percent"]
        if self.tty:
            width = 24
            bar = "#" * int(pct * width / 100)
            rate = self.fetched / max(time.monotonic() - self.t0, 1e-3)
            speed = f" {human(rate)}/s" if stage == "downloading" else ""
            line = (f"\r[{bar:<{width}}] {pct:5.1f}% {stage} {Path(file).name or file} "
                    f"{human(done)}/{human(total)}{speed}")
            self.stream.write(line[:118].ljust(118))
            self.stream.flush()
        elif (stage, file) != self.last_key and (done == 0 or pct >= 100):
            self.stream.write(f"{pct:5.1f}% {stage} {file} ({human(total)})\n")
            self.stream.flush()
        self.last_key = (stage, file)

    def line(self, msg: str) -> None:
        if self.tty and self.enabled:
            self.stream.write("\r" + " " * 118 + "\r")
        self.stream.write(msg + "\n")
        self.stream.flush()


def _confirm(question: str) -> bool:
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer and not sys.stdin.isatty():
        sys.stderr.write(answer if answer.endswith("\n") else answer + "\n")  # not echoed
    if not answer:
        sys.stderr.write("\n")
        raise LofiError("INVALID_PARAMS", "no answer on stdin; pass --yes to set up without asking")
    return answer.strip().lower() in ("y", "yes")


def cmd_setup(args) -> int:
    from lofi.hub import setup

    if args.backend == "musicgen":
        if args.quantize is not None:
            raise LofiError("INVALID_PARAMS", "--quantize: ACE-Step-only (quantized DiT weights), "
                            "not accepted with --backend musicgen")
        from lofi.musicgen.hub import spec as musicgen_spec
        spec, engine = musicgen_spec(), "none"  # the MLX engine reads the Hub layout as it is
    else:
        spec, engine = setup.ACE_STEP, _engine(args.engine)
    plan = setup.plan_setup(args.home, args.revision, args.precision, engine, args.keep_original,
                            spec=spec, quantize=args.quantize)
    err = sys.stderr
    todo = _pending(engine, plan)
    title = spec.title
    nothing = not (plan.missing or plan.unverified or plan.convert_components or todo
                   or (not plan.keep_original and engine == "mlx" and _originals_present(plan)))
    if nothing and (spec.license is None or _license_known(plan.root)):
        print(f"{title} is installed and verified in {plan.root} (revision {plan.remote.commit[:12]}"
              + (f", converted for MLX at {plan.precision}" if engine == "mlx" else "") + ").", file=err)
        return 0
    print(describe_plan(plan) + (f"\n  {todo}" if todo else ""), file=err)
    if spec.license is not None and args.dry_run:
        print(_notice(spec), file=err)
    if not plan.enough_disk:
        raise LofiError(setup.NOT_ENOUGH_DISK, f"not enough free disk at {plan.root}: "
                        f"{setup.human(plan.needed_bytes)} needed, {setup.human(plan.free_bytes)} free. "
                        "Nothing was downloaded.")
    if args.dry_run:
        return 0
    if spec.license is not None and not _license_consent(args, plan.root, spec):
        print("The licence was not accepted. Nothing was downloaded.", file=err)
        return 1
    if nothing:
        print(f"{title} is installed and verified in {plan.root}.", file=err)
        return 0
    if not args.yes and not _confirm("Proceed? [y/N] "):
        print("Nothing was downloaded.", file=err)
        return 1
    bar = SetupBar(err, enabled=not args.quiet)
    try:
        result = setup.run_setup(args.home, args.revision, args.precision, engine, args.keep_original,
                                 on_progress=bar, on_notice=lambda m: bar.line(f"lofi: {m}"), plan=plan)
    except KeyboardInterrupt:
        bar.line(f"lofi: interrupted; run `lofi setup {spec.backend}` again to resume where it stopped")
        raise
    except LofiError:
        bar.line("")
        raise
    if result.state != "ready":
        bar.line(f"{title} is downloaded and verified in {plan.root} but NOT ready to generate"
                 + ("".join(f"\n  {n}" for n in result.notes) if result.notes else ""))
        return 1
    if engine == "none" and spec.backend == "ace-step":
        from lofi.engines import available_engines
        bar.line(f"ACE-Step is downloaded and verified in {plan.root}; no engine was prepared "
                 f"(--engine none)" + "".join(f"\n  {n}: {s}" for n, s in available_engines().items()
                                               if s != "available"))
        return 1 if args.engine == "auto" else 0
    parts = [f"{len(result.downloaded)} files downloaded"]
    if result.repaired:
        parts.append(f"repaired {', '.join(result.repaired)}")
    if result.converted:
        parts.append(f"built {', '.join(result.converted)}" if engine == "onnx"
                     else f"converted {', '.join(result.converted)} ({plan.precision})")
    if result.removed:
        parts.append(f"removed {len(result.removed)} original weight files")
    bar.line(f"{title} is ready in {plan.root} (revision {result.revision[:12]}): " + "; ".join(parts))
    return 0


def _pending(engine: str, plan) -> str | None:
    if engine == "none":
        return None
    from lofi.engines import setup_hooks
    return setup_hooks(engine).pending(plan.root, plan.precision, quantize=plan.quantize)


def _originals_present(plan) -> bool:
    from lofi.hub.setup import is_weight_file
    return any(is_weight_file(f.path) and (plan.root / f.path).exists() for f in plan.remote.files)


def _notice(spec) -> str:
    from lofi.musicgen.hub import license_notice
    return license_notice(spec)


def _license_known(root) -> bool:
    from lofi.musicgen.hub import license_accepted
    return license_accepted(root)


def _license_consent(args, root, spec) -> bool:
    """Show the licence and the model card; an explicit yes (flag or prompt) is recorded."""
    from lofi.musicgen.hub import accept_license, license_accepted, license_notice
    if license_accepted(root):
        return True
    print(license_notice(spec), file=sys.stderr)
    if not args.accept_license and not _confirm(f"Accept the {spec.license[0]} licence? [y/N] "):
        return False
    accept_license(root, spec)
    return True

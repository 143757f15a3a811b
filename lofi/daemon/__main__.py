"""`lofi-daemon` / `python -m lofi.daemon`: parse settings, set up logging, serve, exit."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys

from lofi import __version__
from lofi.settings import SettingsError, add_arguments, from_args

LOG_FILE_MAX = 5 * 2**20


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lofi-daemon",
        description="lofi's generation daemon: JSON-RPC 2.0, one object per line on stdin/stdout "
                    "(see docs/protocol.md). Each setting also reads the LOFI_* variable shown.")
    ap.add_argument("--version", action="version", version=f"lofi-daemon {__version__}")
    # lofi.nvim's own client starts `<daemon_path> --daemon`; this process is always one
    ap.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    add_arguments(ap)
    return ap


def setup_logging(settings) -> None:
    """stderr and $LOFI_HOME/logs/daemon.log; never stdout."""
    fmt = logging.Formatter(f"%(asctime)s lofi[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(settings.log_level.upper())
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(fmt)
    root.addHandler(to_stderr)
    try:
        to_file = logging.StreamHandler(open_log(settings.logs_dir))
        to_file.setFormatter(fmt)
        root.addHandler(to_file)
    except OSError as e:
        root.warning("no log file under %s: %s", settings.logs_dir, e)


def open_log(logs_dir):
    """logs/daemon.log for appending, never through a link (a link there is refused)."""
    if os.path.islink(logs_dir):
        raise OSError(f"{logs_dir} is a symbolic link")
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / "daemon.log"
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size > LOG_FILE_MAX:
        os.replace(path, path.with_suffix(".log.1"))  # one old generation is kept
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return open(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = from_args(args)
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.tracks_dir.mkdir(parents=True, exist_ok=True)
    except SettingsError as e:
        print(f"lofi-daemon: invalid setting {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lofi-daemon: cannot use LOFI_HOME {args.home or os.environ.get('LOFI_HOME')}: {e}",
              file=sys.stderr)
        return 2

    from lofi.daemon.transport import claim_stdout
    out_fd = claim_stdout()
    setup_logging(settings)
    from lofi.daemon.server import Daemon

    try:  # the track cache must be usable before anything is promised to a client
        daemon = Daemon(settings, in_fd=sys.stdin.fileno(), out_fd=out_fd)
        daemon.cache.open()
    except OSError as e:
        print(f"lofi-daemon: cannot use LOFI_HOME {settings.home}: {e}", file=sys.stderr)
        logging.shutdown()
        return 2
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda sig, frame: daemon.request_stop(
                f"signal {signal.Signals(sig).name}"))
    try:
        code = daemon.serve()
    except Exception:
        logging.getLogger("lofi.daemon").exception("fatal error")
        code = 1
    logging.shutdown()
    # The worker may be inside a native call that cannot be interrupted: end the process now.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

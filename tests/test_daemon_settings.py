"""Settings: defaults per platform, CLI > environment > default, validation, and that the daemon
refuses a bad value at start with exit status 2 and applies good ones."""

import subprocess
import sys
from pathlib import Path

import pytest

from lofi.settings import Settings, SettingsError, default_home, parse_size
from tests.daemon_util import ROOT, Daemon, make_home


def test_default_home_per_platform():
    env = {"HOME": "/home/u"}
    assert default_home("linux", env) == Path("/home/u/.cache/lofi.nvim")
    assert default_home("linux", dict(env, XDG_CACHE_HOME="/x/cache")) == Path("/x/cache/lofi.nvim")
    assert default_home("linux", dict(env, XDG_CACHE_HOME="relative")) == Path("/home/u/.cache/lofi.nvim")
    assert default_home("darwin", env) == Path("/home/u/Library/Caches/lofi.nvim")
    assert default_home("win32", dict(env, LOCALAPPDATA="C:/Users/u/AppData/Local")) == \
        Path("C:/Users/u/AppData/Local/lofi.nvim")


def test_defaults_and_derived_paths():
    s = Settings.load({}, {"HOME": "/home/u"})
    assert s.home == Path("/home/u/.cache/lofi.nvim")
    assert (s.backend, s.engine, s.device, s.threads) == ("ace-step", "auto", "auto", None)
    assert (s.queue_size, s.cache_size, s.precision, s.format) == (5, 2 * 10**9, "auto", "wav")
    assert s.checkpoint_dir == s.home / "ace-step"
    assert s.tracks_dir == s.home / "tracks" and s.logs_dir == s.home / "logs"


def test_flags_override_environment():
    env = {"LOFI_HOME": "/a", "LOFI_QUEUE_SIZE": "3", "LOFI_CACHE_SIZE": "500MB", "LOFI_THREADS": "4",
           "LOFI_PRECISION": "fp16", "LOFI_ENGINE": "onnx", "LOFI_DEVICE": "CPU", "LOFI_BACKEND": "musicgen",
           "LOFI_KEEP_LOADED": "yes"}
    s = Settings.load({}, env)
    assert (s.home, s.queue_size, s.cache_size, s.threads) == (Path("/a"), 3, 500 * 10**6, 4)
    assert (s.precision, s.engine, s.device, s.backend, s.keep_loaded) == ("fp16", "onnx", "cpu", "musicgen", True)
    s = Settings.load({"queue_size": "9", "home": "/b", "cache_size": "1GiB"}, env)
    assert (s.home, s.queue_size, s.cache_size) == (Path("/b"), 9, 2**30)


@pytest.mark.parametrize("raw,expect", [("2GB", 2 * 10**9), ("2 gb", 2 * 10**9), ("1.5GiB", int(1.5 * 2**30)),
                                        ("123456", 123456), ("0", 0), ("10k", 10**4), ("3MiB", 3 * 2**20)])
def test_parse_size(raw, expect):
    assert parse_size(raw) == expect


@pytest.mark.parametrize("name,value,fragment", [
    ("LOFI_QUEUE_SIZE", "0", "from 1 to 100"), ("LOFI_QUEUE_SIZE", "lots", "integer"),
    ("LOFI_CACHE_SIZE", "2 parsecs", "size"), ("LOFI_CACHE_SIZE", "-1GB", "size"),
    ("LOFI_PRECISION", "fp8", "fp32, fp16, bf16"), ("LOFI_BACKEND", "diffrhythm", "ace-step, musicgen"),
    ("LOFI_ENGINE", "torch", "auto, mlx, onnx"), ("LOFI_DEVICE", "tpu", "auto, cpu, gpu"),
    ("LOFI_THREADS", "-2", "from 1 to 1024"), ("LOFI_KEEP_LOADED", "maybe", "true or false"),
])
def test_bad_values_are_named(name, value, fragment):
    with pytest.raises(SettingsError) as e:
        Settings.load({}, {name: value, "HOME": "/h"})
    assert name in str(e.value) and fragment in str(e.value)


def _run_daemon(args, env_extra, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LOFI_HOME": str(tmp_path / "h")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "lofi.daemon", *args], cwd=ROOT, env=env,
                          input=b"", capture_output=True, timeout=30)


@pytest.mark.parametrize("args,env", [([], {"LOFI_QUEUE_SIZE": "abc"}), (["--cache-size", "huge"], {}),
                                      (["--precision", "fp64"], {}), (["--bogus-flag"], {})])
def test_daemon_refuses_bad_settings_with_status_2(tmp_path, args, env):
    r = _run_daemon(args, env, tmp_path)
    assert r.returncode == 2
    assert r.stdout == b""  # nothing but protocol ever goes to stdout
    assert r.stderr.strip()


def test_home_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _run_daemon(["--home", str(tmp_path / "file")], {}, tmp_path)
    assert r.returncode == 2 and b"LOFI_HOME" in r.stderr


def test_settings_are_applied(tmp_path):
    """queue size, cache size, precision and backend from the environment show up in the daemon."""
    home = make_home(tmp_path)
    with Daemon(home, "--queue-size", "2", env={"LOFI_CACHE_SIZE": "3MB", "LOFI_PRECISION": "fp16",
                                                 "LOFI_ENGINE": "mlx", "LOFI_DEVICE": "cpu"}) as d:
        st = d.call("status")
        assert (st["queue_size"], st["precision"], st["engine"], st["device"]) == (2, "fp16", "mlx", "cpu")
        assert d.call("cache_stats")["limit_bytes"] == 3 * 10**6
        assert (home / "logs" / "daemon.log").is_file()
        assert "ready" in (home / "logs" / "daemon.log").read_text()
    with Daemon(home, env={"LOFI_BACKEND": "musicgen"}) as d:
        assert d.call("status")["backend"] == "musicgen"
        r = d.request("generate", {"prompt": "lofi", "duration_sec": 5, "seed": 1})
        assert r["error"]["data"]["code"] == "MODEL_NOT_FOUND" and "MusicGen" in r["error"]["message"]

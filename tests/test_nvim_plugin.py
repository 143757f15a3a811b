"""The Neovim plugin without a daemon: framing, RPC client, config, commands, UI, help tags.

Each case runs in tests/nvim/unit_spec.lua inside a real headless Neovim (one process for all)."""

import os
import time

import pytest

from tests.nvim.run import check, run_spec

CASES = [
    "line_buffer_split",
    "line_buffer_many",
    "line_buffer_utf8_bytewise",
    "line_buffer_large",
    "rpc_request_response_split",
    "rpc_errors",
    "rpc_timeout_and_fail_all",
    "config_validation",
    "setup_fast_and_spawns_nothing",
    "no_globals",
    "generate_invalid_opts_calls_back_once",
    "daemon_not_found",
    "crash_loop_gives_up",
    "events_subscribe",
    "commands_parse",
    "commands_parse_modes",
    "commands_complete",
    "ui_concurrent_jobs_and_fidget",
    "help_tags",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_spec("unit_spec", tmp_path_factory.mktemp("nvim_unit"))


@pytest.mark.parametrize("case", CASES)
def test_plugin(results, case):
    check(results, case)


def test_every_case_listed(results):
    assert sorted(k for k in results if not k.startswith("__")) == sorted(CASES)


def test_exit_kills_a_daemon_that_ignores_shutdown(tmp_path):
    """VimLeavePre: `shutdown`, stdin closed, then SIGKILL after shutdown_timeout_ms (1.5 s)."""
    t0 = time.monotonic()
    res = run_spec("exit_spec", tmp_path)
    elapsed = time.monotonic() - t0
    check(res, "stubborn_daemon_started")
    pid = res["__data__"]["daemon_pid"]
    assert 1.5 <= elapsed < 10, f"Neovim took {elapsed:.2f} s to exit"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"daemon {pid} survived Neovim")

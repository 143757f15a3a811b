"""`lofi setup musicgen` against the loopback Hub (tests/hub_server.py) serving the tiny MusicGen
checkpoint: the licence consent (refused, prompted, flag, remembered), download and verification
into $LOFI_HOME/musicgen/, and the installed folder's state for the daemon."""

from __future__ import annotations

import io
import socket
import sys

import pytest

from lofi import cli
from lofi.hub import setup
from tests.hub_server import HubServer
from tests.test_musicgen import CKPT

REV = "d4" * 20
REPO = "facebook/musicgen-small"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub.utils import _detect_agent
    server = HubServer(REPO).start()
    server.add_folder(REV, CKPT)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                "https_proxy", "all_proxy", "LOFI_MUSICGEN_REVISION", "LOFI_MUSICGEN_REPO"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    outside = []
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            outside.append(address)
            raise OSError("test: no network outside loopback")
        return real_connect(sock, address)

    def lookup(host, *a, **kw):
        if host not in LOOPBACK:
            outside.append(host)
            raise OSError("test: no name lookups")
        return real_lookup(host, *a, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield server
    server.stop()
    assert outside == []


def run_cli(monkeypatch, capsys, stdin: str, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(["setup", "musicgen", *args])
    return rc, capsys.readouterr().err


def test_licence_refused_downloads_nothing(hub, tmp_path, monkeypatch, capsys):
    home = tmp_path / "lofi"
    rc, err = run_cli(monkeypatch, capsys, "n\n", "--yes", "--home", str(home))
    assert rc == 1 and "CC-BY-NC-4.0" in err and "huggingface.co/facebook/musicgen-small" in err
    assert "not accepted" in err and hub.gets() == []
    assert not (home / "musicgen" / "model.safetensors").exists()
    # no answer at all (a script without the flag): refused with the way out named
    rc, err = run_cli(monkeypatch, capsys, "", "--yes", "--home", str(home))
    assert rc == 2 and "--yes" in err and hub.gets() == []


def test_accepted_licence_installs_and_is_remembered(hub, tmp_path, monkeypatch, capsys):
    from lofi.musicgen.hub import MUSICGEN, license_accepted
    home = tmp_path / "lofi"
    rc, err = run_cli(monkeypatch, capsys, "", "--yes", "--accept-license", "--home", str(home))
    assert rc == 0, err
    root = home / "musicgen"
    assert "MusicGen is ready in" in err and "CC-BY-NC-4.0" in err
    for f in ("config.json", "tokenizer.json", "model.safetensors", "generation_config.json"):
        assert (root / f).read_bytes() == (CKPT / f).read_bytes()
    st = setup.load_state(root)
    assert st["complete"] and st["revision"] == REV and license_accepted(root)
    assert setup.backend_state(home, "none", MUSICGEN)["state"] == "ready"
    # again, without the flag and without any answer: nothing asked, nothing fetched
    hub.clear_log()
    rc, err = run_cli(monkeypatch, capsys, "", "--home", str(home))
    assert rc == 0 and "installed and verified" in err and "Accept the" not in err and hub.gets() == []
    # a damaged file is reported for the daemon, and a setup repairs it keeping the consent
    (root / "model.safetensors").write_bytes(b"broken")
    assert setup.backend_state(home, "none", MUSICGEN)["state"] == "damaged"
    rc, err = run_cli(monkeypatch, capsys, "", "--yes", "--home", str(home))
    assert rc == 0 and license_accepted(root)
    assert (root / "model.safetensors").read_bytes() == (CKPT / "model.safetensors").read_bytes()


def test_licence_accepted_at_the_prompt(hub, tmp_path, monkeypatch, capsys):
    home = tmp_path / "lofi"
    rc, err = run_cli(monkeypatch, capsys, "yes\ny\n", "--home", str(home))
    assert rc == 0, err
    assert "Accept the CC-BY-NC-4.0 licence?" in err and "Proceed?" in err
    assert (home / "musicgen" / "model.safetensors").is_file()


def test_daemon_setup_musicgen_needs_the_licence(hub, tmp_path):
    import time
    from lofi.errors import LofiError
    from lofi.musicgen.hub import license_accepted
    from tests.test_setup import FakeCall, FakeDaemon
    from lofi.daemon import setup as daemon_setup
    home = tmp_path / "lofi"
    d = FakeDaemon(home)
    plan = daemon_setup.handle_setup(d, {"backend": "musicgen", "dry_run": True}, FakeCall())
    assert plan["state"] == "not_installed" and plan["license"] == "CC-BY-NC-4.0"
    assert plan["license_accepted"] is False and plan["model_card"].endswith(REPO)
    assert plan["convert"] == [] and plan["download_bytes"] > 0 and hub.gets() == []
    with pytest.raises(LofiError) as e:
        daemon_setup.handle_setup(d, {"backend": "musicgen"}, FakeCall())
    assert e.value.code == "INVALID_PARAMS" and "accept_license" in e.value.message
    assert hub.gets() == []
    call = FakeCall()
    res = daemon_setup.handle_setup(d, {"backend": "musicgen", "accept_license": True}, call)
    assert res == {"backend": "musicgen", "started": True, "path": str(home / "musicgen")}
    call.deferred[0]()
    deadline = time.monotonic() + 60
    while not any(m in ("setup_complete", "setup_error") for m, _ in d.notes):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert d.notes[-1][0] == "setup_complete" and d.notes[-1][1]["backend"] == "musicgen"
    assert license_accepted(home / "musicgen")
    assert all(p["backend"] == "musicgen" for m, p in d.notes if m == "download_progress")

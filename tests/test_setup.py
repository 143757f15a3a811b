"""`lofi setup ace-step` against a loopback Hub (tests/hub_server.py) serving the tiny checkpoint:
download, progress, resume, verification, repair, disk check, revisions and MLX conversion.
No network but 127.0.0.1; the real Hub is never contacted."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import to_mlx
from lofi.hub import setup
from lofi.checkpoint import COMPONENTS
from lofi.errors import LofiError
from tests.conftest import CHECKPOINT
from tests.hub_server import HubServer

REV_A = "a1" * 20
REV_B = "b2" * 20
BIG = "ace_step_transformer/diffusion_pytorch_model.safetensors"
VOCODER = "music_vocoder/diffusion_pytorch_model.safetensors"
NEEDED = sorted(str(p.relative_to(CHECKPOINT)) for p in CHECKPOINT.rglob("*") if p.is_file())


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub.utils import _detect_agent

    server = HubServer().start()
    server.add_folder(REV_A, CHECKPOINT)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token, no cache of the user's
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "http_proxy", "https_proxy", "all_proxy", setup.REVISION_ENV):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub's user-agent code fetches an "agent harness" list once per process from the
    # HF_ENDPOINT it read at import, which may predate this test: give it the list up front.
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    # and make sure: any connection or name lookup outside loopback is recorded and fails the test
    outside = []
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            outside.append(address)
            raise OSError(f"test: no network outside loopback ({address})")
        return real_connect(sock, address)

    def lookup(host, *args, **kwargs):
        if host not in LOOPBACK:
            outside.append(host)
            raise OSError(f"test: no name lookups ({host})")
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield server
    server.stop()
    assert outside == [], f"tried to reach the network outside loopback: {outside}"


@pytest.fixture
def home(tmp_path):
    return tmp_path / "lofi"


def changed_vocoder() -> bytes:
    """The vocoder weights of revision B: one tensor differs."""
    w = load_file(str(CHECKPOINT / VOCODER))
    name = sorted(k for k in w if w[k].dtype == np.float32 and w[k].size > 16)[0]
    w[name] = (w[name] * np.float32(1.5)).astype(np.float32)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lofi_vocoder_{os.getpid()}.safetensors"
    save_file(w, str(path))
    try:
        return path.read_bytes()
    finally:
        path.unlink()


def stage_runs(events):
    stages = [e["stage"] for e in events]
    return [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]


# -- from nothing to ready ---------------------------------------------------------------------

def test_setup_from_nothing_progress_in_order_then_ready(hub, home):
    assert setup.backend_state(home)["state"] == "not_installed"
    events, seen_states = [], {}

    def on_progress(ev):
        events.append(ev)
        if ev["stage"] not in seen_states and ev["bytes_done"] > 0:
            seen_states[ev["stage"]] = setup.backend_state(home)

    plan = setup.plan_setup(home, REV_A, precision="fp32")
    assert plan.missing == NEEDED and plan.download_bytes == sum(
        (CHECKPOINT / f).stat().st_size for f in NEEDED)
    assert plan.convert_components == list(COMPONENTS)
    result = setup.run_setup(home, REV_A, precision="fp32", on_progress=on_progress)

    assert result.state == "ready" and result.revision == REV_A
    assert sorted(result.downloaded) == NEEDED and result.converted == list(COMPONENTS)
    assert stage_runs(events) == ["downloading", "verifying", "converting"]
    pct = [e["overall_percent"] for e in events]
    assert pct == sorted(pct) and pct[-1] == 100.0 and max(pct[:-1]) < 100.0
    assert set(events[0]) == {"backend", "stage", "file", "bytes_done", "bytes_total", "overall_percent"}
    for f in NEEDED:  # every file reported from its first byte to its last
        done = [e["bytes_done"] for e in events if e["stage"] == "downloading" and e["file"] == f]
        assert done[0] == 0 and done[-1] == (CHECKPOINT / f).stat().st_size
    # while it ran, get_backends' state said so, with a percent
    assert seen_states["downloading"]["state"] == "downloading"
    assert 0 <= seen_states["downloading"]["percent"] < 100
    assert seen_states["converting"]["state"] == "converting"

    assert setup.backend_state(home) == {"state": "ready", "revision": REV_A}
    for f in NEEDED:
        assert (home / "ace-step" / f).read_bytes() == (CHECKPOINT / f).read_bytes()
    # only the files the engines need were fetched: no README, no .gitattributes
    assert sorted({r["file"] for r in hub.gets()}) == NEEDED
    # LFS files came from the CDN origin, git files from the Hub itself
    assert {r["server"] for r in hub.gets(BIG)} == {"cdn"}
    assert {r["server"] for r in hub.gets("umt5-base/config.json")} == {"hub"}
    manifest = json.loads((home / "ace-step" / "mlx" / "manifest.json").read_text())
    assert manifest["revision"] == REV_A and manifest["precision"] == "fp32"
    for comp in COMPONENTS:
        assert to_mlx.converted_weights(home, comp, "fp32")
        assert to_mlx.converted_weights(home, comp, "fp16") is None  # made at another precision
    assert not (home / "ace-step" / ".lofi" / "partial").exists()

    # a second setup has nothing to do and fetches nothing
    hub.clear_log()
    again = setup.run_setup(home, REV_A, precision="fp32")
    assert again.downloaded == [] and again.converted == [] and hub.gets() == []


def test_generate_with_converted_weights_equals_original_at_fp32(hub, home, monkeypatch, tmp_path):
    """The converted fp32 weights give the same audio as the original files, sample for sample.
    The originals are deleted after conversion and the modules' own loaders are disabled, so the
    second run can only have used the converted files."""
    from lofi_mlx.engine import MLXEngine
    from lofi_mlx.acestep import dcae
    from lofi_mlx.acestep import dit
    from lofi_mlx.acestep import umt5
    from lofi_mlx.acestep import vocoder
    from lofi.params import GenerateParams
    from lofi.acestep.pipeline import Pipeline
    import soundfile as sf

    result = setup.run_setup(home, REV_A, precision="fp32", keep_original=False)
    root = home / "ace-step"
    assert sorted(result.removed) == sorted(f for f in NEEDED if f.endswith(".safetensors"))
    assert not [p for d in COMPONENTS.values() for p in (root / d).glob("*.safetensors")]
    assert setup.backend_state(home)["state"] == "ready"

    def params():
        return GenerateParams("lofi hip hop, jazzy piano", 5.0, infer_steps=3, seed=7)

    ref = Pipeline(CHECKPOINT, MLXEngine(CHECKPOINT, "fp32", "cpu")).generate(params(), tmp_path / "a.wav")

    def refuse(*a, **k):
        raise AssertionError("loaded the original weights")

    for mod in (umt5, dit, dcae, vocoder):
        monkeypatch.setattr(mod, "load", refuse)
    engine = MLXEngine(root, "fp32", "cpu")
    assert all(engine.converted(c) for c in COMPONENTS)
    out = Pipeline(root, engine).generate(params(), tmp_path / "b.wav")
    a, _ = sf.read(ref["path"], dtype="float32")
    b, _ = sf.read(out["path"], dtype="float32")
    assert a.shape == b.shape and np.array_equal(a, b)


# -- interruption and resume -------------------------------------------------------------------

def test_interrupted_transfer_resumes_with_a_range_request(hub, home):
    size = (CHECKPOINT / BIG).stat().st_size
    half = size // 2
    hub.cut(BIG, half)  # the connection drops after half the file
    result = setup.run_setup(home, REV_A, engine="none")
    gets = hub.gets(BIG)
    assert [g.get("cut_at") for g in gets] == [half, None]
    assert gets[0]["range"] is None and gets[1]["range"] == f"bytes={half}-"
    assert gets[1]["status"] == 206
    assert result.state == "ready"
    assert (home / "ace-step" / BIG).read_bytes() == (CHECKPOINT / BIG).read_bytes()


def test_download_left_by_a_killed_process_resumes_where_it_stopped(hub, home):
    size = (CHECKPOINT / BIG).stat().st_size
    half = size // 2 + 12345
    hub.cut(BIG, half, stall=True)  # send half, then hang like a dead network
    env = dict(os.environ, LOFI_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "lofi.cli", "setup", "ace-step", "--yes",
                             "--engine", "none", "--revision", REV_A],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=str(Path(__file__).parent.parent))
    part = setup.partial_path(home / "ace-step", BIG)
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size == half):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the download never reached the cut"
            time.sleep(0.05)
        st = setup.backend_state(home)  # another process holds the setup: downloading
        assert st["state"] == "downloading" and 0 < st["percent"] < 100
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        hub.release()
    st = setup.backend_state(home)
    assert st["state"] == "damaged" and "resume" in st["detail"]
    with pytest.raises(LofiError) as e:
        setup.require_ready(home)
    assert e.value.code == "MODEL_LOAD_FAILED" and "lofi setup ace-step" in e.value.message

    hub.clear_log()
    plan = setup.plan_setup(home, REV_A, engine="none")
    assert plan.resume_bytes == half
    result = setup.run_setup(home, REV_A, engine="none")
    gets = hub.gets(BIG)
    assert len(gets) == 1 and gets[0]["range"] == f"bytes={half}-"
    assert BIG in result.downloaded and setup.backend_state(home)["state"] == "ready"
    assert (home / "ace-step" / BIG).read_bytes() == (CHECKPOINT / BIG).read_bytes()
    assert not part.exists()


def test_expired_cdn_address_is_renewed_and_server_errors_are_retried(hub, home):
    hub.fail_next(BIG, 403)
    hub.fail_next(VOCODER, 503)
    assert setup.run_setup(home, REV_A, engine="none").state == "ready"
    heads = [r for r in hub.requests if r["method"] == "HEAD" and r.get("file") == BIG]
    assert len(heads) == 2  # a new signed address was asked for
    assert [g["status"] for g in hub.gets(BIG)] == [403, 200]
    assert [g["status"] for g in hub.gets(VOCODER)] == [503, 200]
    for f in (BIG, VOCODER):
        assert (home / "ace-step" / f).read_bytes() == (CHECKPOINT / f).read_bytes()


# -- verification and repair -------------------------------------------------------------------

def corrupt(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupted_file_is_detected_reported_and_repaired(hub, home):
    setup.run_setup(home, REV_A, engine="none")
    target = home / "ace-step" / VOCODER
    corrupt(target)
    st = setup.backend_state(home)
    assert st["state"] == "damaged" and st["files"] == [VOCODER]
    hub.clear_log()
    notices = []
    result = setup.run_setup(home, REV_A, engine="none", on_notice=notices.append)
    assert result.repaired == [VOCODER] and result.downloaded == [VOCODER]
    assert any(VOCODER in n and "verification failed" in n for n in notices)
    assert [g["file"] for g in hub.gets()] == [VOCODER]  # only the bad file was fetched
    assert target.read_bytes() == (CHECKPOINT / VOCODER).read_bytes()
    assert setup.backend_state(home)["state"] == "ready"


def test_silent_corruption_is_found_by_verification(hub, home):
    """A flipped byte with size and mtime unchanged: only hashing can see it."""
    setup.run_setup(home, REV_A, engine="none")
    target = home / "ace-step" / "umt5-base" / "tokenizer.json"  # a git (non-LFS) file: sha1 ETag
    corrupt(target, keep_mtime=True)
    assert setup.backend_state(home)["state"] == "ready"  # the cheap check cannot tell
    assert setup.verify_installed(home) == ["umt5-base/tokenizer.json"]
    assert setup.backend_state(home)["state"] == "damaged"
    hub.clear_log()
    result = setup.run_setup(home, REV_A, engine="none")
    assert result.repaired == ["umt5-base/tokenizer.json"]
    assert [g["file"] for g in hub.gets()] == ["umt5-base/tokenizer.json"]
    assert setup.verify_installed(home) == []
    assert setup.backend_state(home)["state"] == "ready"


def test_a_download_that_never_matches_the_hub_hash_fails_clearly(hub, home):
    bad = bytearray((CHECKPOINT / VOCODER).read_bytes())
    bad[100] ^= 1
    hub.serve_instead(VOCODER, bytes(bad))
    with pytest.raises(LofiError) as e:
        setup.run_setup(home, REV_A, engine="none")
    assert e.value.code == setup.VERIFY_FAILED and VOCODER in e.value.message
    assert len(hub.gets(VOCODER)) == 2  # fetched, failed, fetched again, failed
    assert not (home / "ace-step" / VOCODER).exists()
    assert setup.backend_state(home)["state"] == "damaged"
    hub.serve_instead(VOCODER, None)
    assert setup.run_setup(home, REV_A, engine="none").state == "ready"


# -- free disk ---------------------------------------------------------------------------------

def test_not_enough_disk_is_refused_before_anything_is_downloaded(hub, home):
    with pytest.raises(LofiError) as e:
        setup.run_setup(home, REV_A, free=lambda path: 10_000_000)
    assert e.value.code == setup.NOT_ENOUGH_DISK
    assert "Nothing was downloaded" in e.value.message and "free" in e.value.message
    assert e.value.data["needed_bytes"] > e.value.data["free_bytes"] == 10_000_000
    assert hub.gets() == [] and not any(r["method"] == "HEAD" for r in hub.requests)
    root = home / "ace-step"
    assert not any(p.is_file() for p in root.rglob("*") if ".lofi" not in p.parts)
    assert not list(root.rglob("*.part"))
    assert setup.backend_state(home)["state"] == "not_installed"


def test_cli_refuses_small_disk_and_asks_before_downloading(hub, home, monkeypatch, capsys):
    from lofi import cli
    base = ["setup", "ace-step", "--home", str(home), "--revision", REV_A, "--engine", "none"]

    real = setup.free_space
    monkeypatch.setattr(setup, "free_space", lambda path: 1000)
    assert cli.main(base + ["--yes"]) == 2
    err = capsys.readouterr().err
    assert "NOT_ENOUGH_DISK" in err and "free disk: 1.0 kB" in err and "15.2 MB" in err
    assert hub.gets() == []
    monkeypatch.setattr(setup, "free_space", real)

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    assert "total size: 15.2 MB in 11 files" in err and "free disk:" in err and "Proceed?" in err
    assert hub.gets() == []

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # a script that forgot --yes
    assert cli.main(base) == 2
    assert "--yes" in capsys.readouterr().err and hub.gets() == []

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert cli.main(base + ["--quiet"]) == 0
    err = capsys.readouterr().err  # --engine none: downloaded only, so not called "ready"
    assert "downloaded and verified" in err and "no engine was prepared" in err and "is ready" not in err
    assert sorted({g["file"] for g in hub.gets()}) == NEEDED
    assert cli.main(base) == 0  # nothing left to do: no question asked
    assert "installed and verified" in capsys.readouterr().err


# -- revisions and conversion ------------------------------------------------------------------

def test_revision_is_pinned_and_overridable(hub, home, monkeypatch):
    assert setup.pinned_revision() == setup.DEFAULT_REVISION
    assert len(setup.DEFAULT_REVISION) == 40
    with pytest.raises(LofiError) as e:  # this Hub does not have the real pinned commit
        setup.plan_setup(home)
    assert e.value.code == setup.DOWNLOAD_FAILED and "revision" in e.value.message
    monkeypatch.setenv(setup.REVISION_ENV, REV_A)
    assert setup.pinned_revision() == REV_A
    assert setup.plan_setup(home, engine="none").remote.commit == REV_A
    assert setup.pinned_revision("main") == "main"
    hub.add_folder(REV_B, CHECKPOINT, branch="main")
    assert setup.plan_setup(home, "main", engine="none").remote.commit == REV_B  # a branch resolves


def test_conversion_from_an_older_revision_is_detected_and_redone(hub, home):
    first = setup.run_setup(home, REV_A, precision="fp16")
    assert first.converted == list(COMPONENTS)
    root = home / "ace-step"
    before = {c: (root / "mlx" / f"{c}.safetensors").read_bytes() for c in COMPONENTS}
    hub.add_folder(REV_B, CHECKPOINT, changes={VOCODER: changed_vocoder()})

    # revision B's files, downloaded without converting: the old conversion is now stale
    hub.clear_log()
    assert setup.plan_setup(home, REV_B, engine="none").outdated == [VOCODER]
    update = setup.run_setup(home, REV_B, engine="none")
    assert [g["file"] for g in hub.gets()] == [VOCODER]  # only the changed file
    assert update.downloaded == [VOCODER] and update.repaired == []  # an update, not a repair
    assert to_mlx.converted_weights(home, "vocoder") is None
    assert to_mlx.converted_weights(home, "transformer") is not None  # its sources did not change

    plan = setup.plan_setup(home, REV_B, precision="fp16")
    assert plan.convert_components == ["vocoder"] and plan.missing == []
    result = setup.run_setup(home, REV_B, precision="fp16")
    assert result.converted == ["vocoder"] and result.downloaded == []
    manifest = json.loads((root / "mlx" / "manifest.json").read_text())
    assert manifest["revision"] == REV_B
    assert (root / "mlx" / "vocoder.safetensors").read_bytes() != before["vocoder"]
    assert (root / "mlx" / "transformer.safetensors").read_bytes() == before["transformer"]
    assert to_mlx.conversion_fresh(root, "fp16")
    w = to_mlx.converted_weights(home, "vocoder", "fp16")
    assert w and all(str(v.dtype) == "mlx.core.float16" for v in w.values())

    # a revision whose files are all the same: nothing converted, the manifest names it
    hub.add_folder("c3" * 20, CHECKPOINT, changes={VOCODER: changed_vocoder()})
    same = setup.run_setup(home, "c3" * 20, precision="fp16")
    assert same.converted == [] and same.downloaded == []
    assert json.loads((root / "mlx" / "manifest.json").read_text())["revision"] == "c3" * 20

    # asking for fp32 makes every component stale
    assert setup.plan_setup(home, REV_B, precision="fp32").convert_components == list(COMPONENTS)


def test_converted_weights_are_exactly_what_the_modules_load(hub, home):
    """fp16 conversion: same names, dtypes (fp32 islands kept) and values as module.load."""
    from mlx.utils import tree_flatten
    setup.run_setup(home, REV_A, precision="fp16")
    root = home / "ace-step"
    for comp in COMPONENTS:
        ref = dict(tree_flatten(to_mlx.build(root, comp, "fp16").parameters()))
        got = to_mlx.converted_weights(home, comp, "fp16")
        assert set(got) == set(ref), comp
        for k, v in ref.items():
            assert got[k].dtype == v.dtype and np.array_equal(np.array(got[k]), np.array(v)), (comp, k)
    dtypes = {str(v.dtype) for v in to_mlx.converted_weights(home, "text_encoder").values()}
    assert dtypes == {"mlx.core.float16", "mlx.core.float32"}  # UMT5 keeps `wo` in fp32


def test_removed_originals_stay_removed_until_asked_for(hub, home):
    setup.run_setup(home, REV_A, precision="fp16", keep_original=False)
    root = home / "ace-step"
    assert not [p for d in COMPONENTS.values() for p in (root / d).glob("*.safetensors")]
    assert all((root / f).exists() for f in NEEDED if not f.endswith(".safetensors"))
    hub.clear_log()
    plan = setup.plan_setup(home, REV_A, precision="fp16")
    assert plan.missing == [] and len(plan.removed) == 4 and not plan.keep_original
    assert setup.run_setup(home, REV_A, precision="fp16").downloaded == [] and hub.gets() == []
    again = setup.run_setup(home, REV_A, precision="fp16", keep_original=True)
    assert sorted(again.downloaded) == sorted(f for f in NEEDED if f.endswith(".safetensors"))
    assert setup.load_state(root)["removed"] == []


# -- the daemon method -------------------------------------------------------------------------

class FakeDaemon:
    def __init__(self, home):
        from lofi.settings import Settings
        self.settings = Settings.load({"home": str(home)}, env={})
        self.notes = []
        self.worker = type("W", (), {"release_requested": threading.Event()})()
        self.backends = type("B", (), {"engine_name": staticmethod(lambda: "mlx")})()

    def notify(self, method, params):
        self.notes.append((method, params))


class FakeCall:
    def __init__(self):
        self.deferred = []

    def after_send(self, fn):
        self.deferred.append(fn)


def test_daemon_setup_method_plans_then_runs_with_notifications(hub, home):
    from lofi.daemon import setup as daemon_setup
    d = FakeDaemon(home)
    call = FakeCall()
    plan = daemon_setup.handle_setup(d, {"backend": "ace-step", "dry_run": True, "revision": REV_A}, call)
    assert plan["download_bytes"] == plan["total_bytes"] > 0 and plan["enough_disk"] is True
    assert plan["free_bytes"] > 0 and plan["state"] == "not_installed"
    assert call.deferred == [] and hub.gets() == []

    res = daemon_setup.handle_setup(d, {"backend": "ace-step", "revision": REV_A}, call)
    assert res["started"] is True and d.notes == []  # nothing before the response is sent
    [start] = call.deferred
    start()
    deadline = time.monotonic() + 60
    while not any(m in ("setup_complete", "setup_error") for m, _ in d.notes):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    methods = [m for m, _ in d.notes]
    assert methods[-1] == "setup_complete", d.notes[-1]
    assert set(methods[:-1]) == {"download_progress"}
    progress = [p for m, p in d.notes if m == "download_progress"]
    assert stage_runs(progress) == ["downloading", "verifying", "converting"]
    assert all(p["backend"] == "ace-step" for p in progress) and progress[-1]["overall_percent"] == 100
    assert d.notes[-1][1]["state"] == "ready" and d.notes[-1][1]["revision"] == REV_A
    assert d.worker.release_requested.is_set()


def test_daemon_setup_method_refusals(hub, home, monkeypatch):
    from lofi.daemon import setup as daemon_setup
    d = FakeDaemon(home)
    for params, code in (({"backend": "musicgen"}, "INVALID_PARAMS"),  # its licence not accepted
                         ({"backend": "nope"}, "INVALID_PARAMS"),
                         ({"backend": "ace-step", "precision": "fp8"}, "INVALID_PARAMS")):
        with pytest.raises(LofiError) as e:
            daemon_setup.handle_setup(d, params, FakeCall())
        assert e.value.code == code
    # a refused disk comes back as setup_error, and nothing is fetched
    monkeypatch.setattr(setup, "free_space", lambda path: 0)
    call = FakeCall()
    daemon_setup.handle_setup(d, {"backend": "ace-step", "revision": REV_A}, call)
    call.deferred[0]()
    deadline = time.monotonic() + 30
    while not d.notes:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert d.notes[0][0] == "setup_error" and d.notes[0][1]["code"] == setup.NOT_ENOUGH_DISK
    assert hub.gets() == []


def test_daemon_setup_for_an_engine_that_cannot_run_is_an_error(hub, home, monkeypatch):
    """Downloaded and verified, but the ONNX engine lacks its graph builder: the editor gets
    setup_error naming the missing package, never setup_complete."""
    from lofi.daemon import setup as daemon_setup
    monkeypatch.setitem(sys.modules, "onnx", None)
    d = FakeDaemon(home)
    d.backends = type("B", (), {"engine_name": staticmethod(lambda: "onnx")})()
    call = FakeCall()
    assert daemon_setup.handle_setup(d, {"backend": "ace-step", "revision": REV_A}, call)["started"]
    call.deferred[0]()
    deadline = time.monotonic() + 60
    while not any(m in ("setup_complete", "setup_error") for m, _ in d.notes):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    method, params = d.notes[-1]
    assert method == "setup_error" and params["code"] == "MODEL_LOAD_FAILED", d.notes[-1]
    assert "not ready" in params["message"] and "onnx (builds the graphs)" in params["message"]
    assert params["data"]["state"] == "incomplete"


def test_real_daemon_setup_survives_a_kill_and_resumes(hub, tmp_path):
    """`lofi-daemon`: setup answers at once, streams download_progress while ping still answers;
    killed mid-download, a new daemon resumes the partial file with a Range request."""
    from tests.daemon_util import Daemon, make_home
    home = make_home(tmp_path, checkpoint=False)
    half = (CHECKPOINT / BIG).stat().st_size // 3
    hub.cut(BIG, half, stall=True)
    part = setup.partial_path(home / "ace-step", BIG)
    with Daemon(home) as d:
        res = d.call("setup", {"backend": "ace-step", "revision": REV_A})
        assert res["started"] is True
        first = d.event("download_progress", timeout=30)
        assert first["stage"] == "downloading" and first["backend"] == "ace-step"
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size == half):
            assert time.monotonic() < deadline, d.stderr()[-2000:]
            time.sleep(0.05)
        assert "version" in d.call("ping", timeout=2)  # the RPC loop never waits for the download
        busy = d.call("setup", {"backend": "ace-step", "revision": REV_A})
        assert busy["started"] is False and busy["running"] is True
        d.proc.kill()
        d.proc.wait(5)
    hub.release()
    hub.clear_log()
    with Daemon(home) as d:
        assert d.call("setup", {"backend": "ace-step", "revision": REV_A})["started"] is True
        done = d.event("setup_complete", timeout=120)
        assert done["state"] == "ready" and done["revision"] == REV_A and BIG in done["downloaded"]
        progress = d.events("download_progress")
        # the small file the first daemon fetched before the cut is verified first
        assert stage_runs(progress) == ["verifying", "downloading", "verifying", "converting"]
        assert progress[0]["file"] == "ace_step_transformer/config.json"
        pct = [p["overall_percent"] for p in progress]
        assert pct == sorted(pct) and pct[-1] == 100
        assert not d.events("setup_error")
        backends = d.call("get_backends")["backends"]
        assert next(b for b in backends if b["name"] == "ace-step")["state"] == "ready"
    gets = hub.gets(BIG)
    assert len(gets) == 1 and gets[0]["range"] == f"bytes={half}-"
    assert (home / "ace-step" / BIG).read_bytes() == (CHECKPOINT / BIG).read_bytes()


def test_hf_token_goes_to_the_hub_and_never_to_the_cdn(hub, home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_test_token")
    setup.run_setup(home, REV_A, engine="none")
    hub_reqs = [r for r in hub.requests if r["server"] == "hub"]
    cdn_reqs = [r for r in hub.requests if r["server"] == "cdn"]
    assert hub_reqs and cdn_reqs
    assert all(r["auth"] == "Bearer hf_loopback_test_token" for r in hub_reqs), hub_reqs
    assert all(r["auth"] is None for r in cdn_reqs)


def test_setup_for_the_onnx_engine_builds_graphs_it_then_uses(hub, home, monkeypatch, tmp_path):
    """Setup for the ONNX engine builds the graphs next to the checkpoint (fp32 on a CPU) with
    lofi_cuda.build (torch made unimportable), and the engine uses them without building again."""
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setenv("LOFI_HOME", str(home))
    weights = sum(f.stat().st_size for f in CHECKPOINT.rglob("*.safetensors"))
    # the disk check counts the graphs (fp32 on this CPU: up to twice the 16-bit weights)
    assert setup.plan_setup(home, REV_A, precision="fp16", engine="onnx").convert_bytes == 2 * weights
    events = []
    result = setup.run_setup(home, REV_A, precision="fp16", engine="onnx", on_progress=events.append)
    assert result.state == "ready" and result.converted == ["onnx/fp32"]
    root = home / "ace-step"
    assert (root / "onnx" / "fp32" / "manifest.json").is_file()
    assert [e["file"] for e in events if e["stage"] == "converting"][-1] == "onnx/fp32"
    assert [e["bytes_done"] for e in events if e["stage"] == "converting"][-1] == 6
    import lofi_cuda.build
    monkeypatch.setattr(lofi_cuda.build, "build_all", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("built again")))
    from lofi_cuda.engine import ONNXEngine
    from lofi.params import GenerateParams
    from lofi.acestep.pipeline import Pipeline
    info = Pipeline(root, ONNXEngine(root, "fp32", "cpu")).generate(
        GenerateParams("lofi", 5.0, infer_steps=2, seed=1), tmp_path / "o.wav")
    assert info["engine"] == "onnx" and (tmp_path / "o.wav").is_file()
    # a second setup has nothing left to build
    assert setup.plan_setup(home, REV_A, precision="fp16", engine="onnx").convert_bytes == 0
    again = setup.run_setup(home, REV_A, precision="fp16", engine="onnx")
    assert again.state == "ready" and again.converted == []


def test_onnx_setup_without_the_onnx_package_is_not_ready(hub, home, monkeypatch, capsys):
    """Downloaded and verified, but the engine could not build its graphs: setup says exactly what
    is missing (never an extra the user has, never "ready") and the CLI exits non-zero."""
    from lofi.cli import main
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setenv("LOFI_HOME", str(home))
    assert main(["setup", "ace-step", "--yes", "--engine", "onnx", "--quiet", "--revision", REV_A]) == 1
    err = capsys.readouterr().err
    assert "NOT ready" in err and "onnx (builds the graphs)" in err and "lofi[onnx-cpu]" in err
    assert "is ready" not in err and "export" not in err
    assert not (home / "ace-step" / "onnx").exists()


def test_setup_quantize_converts_the_dit_quantized_on_request(hub, home):
    """`setup --quantize 8` stores the DiT with 8-bit block weights and records it; asking again
    is a no-op, asking for 4 bits converts the DiT (only) again, and the engine asked for those
    bits runs from the conversion."""
    from lofi_mlx.engine import MLXEngine
    first = setup.run_setup(home, REV_A, precision="fp32", quantize=8)
    assert sorted(first.converted) == sorted(COMPONENTS)
    root = home / "ace-step"
    assert to_mlx.converted_quantization(root, "transformer") == {"bits": 8, "group_size": 64}
    assert to_mlx.converted_quantization(root, "vocoder") is None
    assert setup.plan_setup(home, REV_A, precision="fp32", quantize=8).convert_components == []
    plan = setup.plan_setup(home, REV_A, precision="fp32", quantize=4)
    assert plan.convert_components == ["transformer"] and plan.summary()["quantize"] == 4
    again = setup.run_setup(home, REV_A, precision="fp32", quantize=4)
    assert again.converted == ["transformer"]
    assert to_mlx.converted_quantization(root, "transformer") == {"bits": 4, "group_size": 64}
    eng = MLXEngine(root, "fp32", "cpu", quantize=4)
    assert eng.converted("transformer") and not MLXEngine(root, "fp32", "cpu", quantize=8).converted("transformer")
    with pytest.raises(LofiError):
        setup.plan_setup(home, REV_A, precision="fp32", quantize=3)


def test_onnx_setup_quantize_makes_the_int8_dit_graph_once(hub, home, monkeypatch):
    """`setup --engine onnx --quantize 8` on a CPU makes dit_decode.q8 beside the fp32 graphs;
    asking again has nothing to do; 4 bits are refused for ONNX Runtime."""
    pytest.importorskip("onnx")
    monkeypatch.setenv("LOFI_HOME", str(home))
    from lofi.cli_setup import _pending
    from lofi_cuda.quantize import fresh, quantized_path
    first = setup.run_setup(home, REV_A, precision="fp32", engine="onnx", quantize=8)
    out = home / "ace-step" / "onnx" / "fp32"
    assert first.state == "ready" and first.converted == ["onnx/fp32", "onnx/fp32/dit_decode.q8"]
    assert quantized_path(out).is_file() and fresh(out)
    again = setup.run_setup(home, REV_A, precision="fp32", engine="onnx", quantize=8)
    assert again.converted == []
    assert _pending("onnx", setup.plan_setup(home, REV_A, precision="fp32", engine="onnx", quantize=8)) is None
    with pytest.raises(LofiError) as e:
        setup.plan_setup(home, REV_A, precision="fp32", engine="onnx", quantize=4)
    assert e.value.code == "INVALID_PARAMS"

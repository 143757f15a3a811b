"""Engine selection: Apple Silicon -> MLX, usable CUDA -> ONNX, else the faster on CPU (ONNX)."""

import pytest

from lofi import engines
from lofi.errors import LofiError


def fake(monkeypatch, mlx=True, ort=True, onnx=True, apple=False, cuda=False, torch=False):
    """`onnx`: the graph builder (the cuda/onnx-cpu extras); torch is never needed by an engine."""
    have = {"mlx": mlx, "onnxruntime": ort, "onnx": onnx, "torch": torch}
    monkeypatch.setattr(engines, "_installed", lambda m: have.get(m, True))
    monkeypatch.setattr(engines, "_apple_silicon", lambda: apple)
    monkeypatch.setattr(engines, "cuda_usable", lambda: cuda)


@pytest.mark.parametrize("kw,device,expected", [
    (dict(apple=True), "auto", "mlx"),
    (dict(apple=True, cuda=True), "auto", "mlx"),
    (dict(cuda=True), "auto", "onnx"),
    (dict(cuda=True, ort=False), "auto", "mlx"),
    (dict(), "auto", "onnx"),          # Linux CPU: ONNX Runtime measured faster
    (dict(onnx=False), "auto", "mlx"),  # no graphs and no graph builder: MLX
    (dict(torch=False), "auto", "onnx"),  # torch plays no part
    (dict(mlx=False), "cpu", "onnx"),
    (dict(ort=False), "cpu", "mlx"),
])
def test_default_engine(monkeypatch, kw, device, expected):
    fake(monkeypatch, **kw)
    assert engines.default_engine(device) == expected


def test_built_graphs_make_onnx_available_without_the_builder(monkeypatch, tmp_path):
    fake(monkeypatch, onnx=False)
    assert engines.available_engines(tmp_path)["onnx"].startswith("not_installed")
    (tmp_path / "onnx" / "fp32").mkdir(parents=True)
    (tmp_path / "onnx" / "fp32" / "manifest.json").write_text("{}")
    assert engines.available_engines(tmp_path)["onnx"] == "available"
    assert engines.default_engine("auto", tmp_path) == "onnx"


def test_nothing_installed_is_a_clear_error(monkeypatch):
    fake(monkeypatch, mlx=False, ort=False)
    with pytest.raises(LofiError) as e:
        engines.default_engine()
    assert "pip install" in e.value.message
    with pytest.raises(LofiError):
        engines.create_engine("x", "tensorflow")


def test_half_installed_engine_names_what_it_lacks(monkeypatch):
    """onnxruntime without onnx (and no graphs): the message names the onnx package and the
    extras that bring it, not 'no engine installed'."""
    fake(monkeypatch, mlx=False, onnx=False)
    with pytest.raises(LofiError) as e:
        engines.default_engine()
    assert "no inference engine can run" in e.value.message
    assert "onnx package" in e.value.message and "lofi[onnx-cpu]" in e.value.message

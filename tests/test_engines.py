"""Engine selection: Apple Silicon -> MLX, usable CUDA -> ONNX, else the faster on CPU (ONNX)."""

import pytest

from lofi import engines
from lofi.errors import LofiError


def fake(monkeypatch, mlx=True, ort=True, export=True, apple=False, cuda=False):
    have = {"mlx": mlx, "onnxruntime": ort, "torch": export, "onnx": export}
    monkeypatch.setattr(engines, "_installed", lambda m: have.get(m, True))
    monkeypatch.setattr(engines, "_apple_silicon", lambda: apple)
    monkeypatch.setattr(engines, "cuda_usable", lambda: cuda)


@pytest.mark.parametrize("kw,device,expected", [
    (dict(apple=True), "auto", "mlx"),
    (dict(apple=True, cuda=True), "auto", "mlx"),
    (dict(cuda=True), "auto", "onnx"),
    (dict(cuda=True, ort=False), "auto", "mlx"),
    (dict(), "auto", "onnx"),          # Linux CPU: ONNX Runtime measured faster
    (dict(export=False), "auto", "mlx"),  # no graphs and no exporter: MLX
    (dict(mlx=False), "cpu", "onnx"),
    (dict(ort=False), "cpu", "mlx"),
])
def test_default_engine(monkeypatch, kw, device, expected):
    fake(monkeypatch, **kw)
    assert engines.default_engine(device) == expected


def test_exported_graphs_make_onnx_available_without_torch(monkeypatch, tmp_path):
    fake(monkeypatch, export=False)
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

"""The layout's rules, checked on the source tree: one core that imports no framework and no
engine, engines that do not import each other, no import circles, small files, one Engine protocol."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lofi", "lofi_mlx", "lofi_cuda", "convert")
FRAMEWORKS = ("mlx", "onnxruntime", "torch", "onnx")
# a single network's definition may be longer than the rest
NETWORK_FILES = ("lofi_mlx/acestep/", "lofi_mlx/musicgen/", "convert/torch_port/", "lofi_cuda/build/")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement in the file, nested too."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        level_top = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, level_top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((name, level_top))
            out += [(f"{name}.{a.name}", level_top) for a in node.names]  # `from pkg import mod`
    return out


def _graph() -> dict[str, set[str]]:
    mods = _sources()
    graph = {}
    for mod, path in mods.items():
        edges = set()
        for name, _ in _imports(path, mod):
            if name in mods and name != mod:
                edges.add(name)
        graph[mod] = edges
    return graph


def test_core_imports_no_framework_and_no_engine():
    bad = []
    for mod, path in _sources().items():
        if not (mod == "lofi" or mod.startswith("lofi.")):
            continue
        for name, _ in _imports(path, mod):
            head = name.split(".")[0]
            if head in FRAMEWORKS or head in ("lofi_mlx", "lofi_cuda", "convert"):
                bad.append(f"{mod} imports {name}")
    assert not bad, "\n".join(bad)


def test_onnx_engine_does_not_import_the_mlx_engine():
    bad = [f"{mod} imports {name}" for mod, path in _sources().items() if mod.startswith("lofi_cuda")
           for name, _ in _imports(path, mod) if name.split(".")[0] in ("lofi_mlx", "mlx")]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own submodules is not a circle between files
            real = [m for m in comp if not any(o != m and o.startswith(m + ".") for o in comp)]
            if len(real) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_the_checker_finds_a_circle(tmp_path, monkeypatch):
    """The graph walk sees nested imports: a circle made only of function-level imports is found."""
    pkg = tmp_path / "lofi"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from lofi import b\n")
    (pkg / "b.py").write_text("from lofi.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("lofi",))
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()


def test_source_files_stay_small():
    long = []
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).as_posix()
            n = len(p.read_text().splitlines())
            if n > 520 and not rel.startswith(NETWORK_FILES):
                long.append(f"{rel}: {n} lines")
    assert not long, "\n".join(long)


def _members(proto) -> dict[str, object]:
    out = {}
    for klass in reversed(proto.__mro__):
        if klass is object or klass.__name__ in ("Protocol", "Generic"):
            continue
        for name, val in vars(klass).items():
            if not name.startswith("_") or name == "__init__":
                out[name] = val
        for name in getattr(klass, "__annotations__", {}):
            out.setdefault(name, None)
    return out


@pytest.mark.parametrize("name", ["mlx", "onnx"])
def test_engines_implement_the_protocol(name, checkpoint_dir):
    from lofi.engine import Engine
    from lofi.engines import engine_class
    cls = engine_class(name)
    for member, proto_val in _members(Engine).items():
        if callable(proto_val):
            impl = getattr(cls, member, None)
            assert callable(impl), f"{cls.__name__} lacks {member}()"
            want = list(inspect.signature(proto_val).parameters)
            have = inspect.signature(impl).parameters
            for p in want:
                assert p in have, f"{cls.__name__}.{member} has no parameter {p!r}"
    eng = cls(checkpoint_dir, precision="fp32", device="cpu")
    assert isinstance(eng, Engine)
    assert eng.name == name and eng.loaded() == []


def test_musicgen_engine_implements_its_protocol():
    from lofi.engine import MusicgenEngine
    from lofi.engines import engine_class
    from tests.test_musicgen import CKPT
    cls = engine_class("mlx", "musicgen")
    for member, proto_val in _members(MusicgenEngine).items():
        if callable(proto_val):
            impl = getattr(cls, member, None)
            assert callable(impl), f"{cls.__name__} lacks {member}()"
            for p in inspect.signature(proto_val).parameters:
                assert p in inspect.signature(impl).parameters, f"{cls.__name__}.{member}: {p!r}"
    eng = cls(CKPT, precision="fp32", device="cpu")
    assert isinstance(eng, MusicgenEngine) and eng.backend == "musicgen" and eng.loaded() == []

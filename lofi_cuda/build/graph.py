"""A small ONNX graph builder whose weights stream to disk as they are added.

`Graph` collects nodes through `Value` objects with torch-like arithmetic (dtype promotion as
torch does it for tensors: fp16 with fp32 gives fp32), so each network module reads like the
torch port it mirrors. Weights never sit in the model proto: `param` writes each tensor straight
into `<name>.onnx.data` (aligned, external-data references in the proto), so building a graph
holds one tensor (or one chunk of a large one) in memory at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
F32, F16, I64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL
NP = {F32: np.float32, F16: np.float16, I64: np.int64, BOOL: np.bool_}
FLOATS = (F32, F16)
ALIGN = 4096  # lets ONNX Runtime map the data file page by page
CHUNK_BYTES = 64 << 20


class Value:
    """A tensor in the graph being built: its name and element type."""

    __slots__ = ("g", "name", "dtype")

    def __init__(self, g: "Graph", name: str, dtype: int):
        self.g, self.name, self.dtype = g, name, dtype

    def _bin(self, op, other, swap=False):
        a, b = self.g.promote(self, other)
        return self.g.op(op, b, a) if swap else self.g.op(op, a, b)

    __add__ = lambda s, o: s._bin("Add", o)
    __radd__ = lambda s, o: s._bin("Add", o, True)
    __sub__ = lambda s, o: s._bin("Sub", o)
    __rsub__ = lambda s, o: s._bin("Sub", o, True)
    __mul__ = lambda s, o: s._bin("Mul", o)
    __rmul__ = lambda s, o: s._bin("Mul", o, True)
    __truediv__ = lambda s, o: s._bin("Div", o)
    __rtruediv__ = lambda s, o: s._bin("Div", o, True)
    __matmul__ = lambda s, o: s._bin("MatMul", o)

    def __neg__(self):
        return self.g.op("Neg", self)

    def float(self) -> "Value":
        return self.g.cast(self, F32)

    def to(self, dtype: int) -> "Value":
        return self.g.cast(self, dtype)

    def reshape(self, *shape) -> "Value":
        return self.g.reshape(self, shape)

    def permute(self, *perm) -> "Value":
        return self.g.op("Transpose", self, perm=list(perm))


class Graph:
    def __init__(self, name: str, folder: Path, dtype: int = F32):
        self.name, self.folder, self.dtype = name, Path(folder), dtype
        self.nodes, self.inputs, self.outputs, self.inits = [], [], [], []
        # checkpoint weight name -> its initializer, so the engine can feed LoRA-merged weights
        self.weight_map: dict[str, dict] = {}
        self._n = 0
        self._consts: dict = {}
        self.data_name = f"{name}.onnx.data"
        self._data = open(self.folder / self.data_name, "wb")
        self.weight_bytes = 0

    # -- naming, inputs and outputs -----------------------------------------------------------
    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def input(self, name: str, dtype: int, dims: list) -> Value:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        return Value(self, name, dtype)

    def output(self, v: Value, name: str, dims: list) -> None:
        self.nodes.append(helper.make_node("Identity", [v.name], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, v.dtype, dims))

    def output_as(self, v: Value, name: str, dims: list) -> None:
        """Like `output`, without the Identity copy: the node producing `v` writes `name`
        (large outputs such as a KV cache would otherwise be copied once more per run)."""
        old = v.name
        if not any(old in n.output for n in self.nodes):
            raise ValueError(f"{self.name}: {old} is not a node output")
        for n in self.nodes:
            for field in (n.input, n.output):
                for i, x in enumerate(field):
                    if x == old:
                        field[i] = name
        v.name = name
        self.outputs.append(helper.make_tensor_value_info(name, v.dtype, dims))

    # -- nodes -----------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, dtype: int | None = None, outputs: int = 1, **attrs):
        names = [("" if x is None else x.name) for x in inputs]
        outs = [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, names, outs, **attrs))
        if dtype is None:
            dtype = next(x.dtype for x in inputs if x is not None)
        vals = [Value(self, o, dtype) for o in outs]
        return vals[0] if outputs == 1 else vals

    def promote(self, a, b):
        """Operands of an elementwise op in one dtype; python numbers take the tensor's dtype."""
        if not isinstance(b, Value):
            return a, self.const(b, a.dtype)
        if a.dtype != b.dtype and a.dtype in FLOATS and b.dtype in FLOATS:
            return self.cast(a, F32), self.cast(b, F32)
        return a, b

    def cast(self, v: Value, dtype: int) -> Value:
        return v if v.dtype == dtype else self.op("Cast", v, dtype=dtype, to=dtype)

    def const(self, value, dtype: int = F32) -> Value:
        arr = np.asarray(value, dtype=NP[dtype])
        key = (arr.tobytes(), arr.shape, dtype)
        if key not in self._consts:
            name = self._fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = Value(self, name, dtype)
        return self._consts[key]

    def ints(self, values) -> Value:
        return self.const(np.asarray(values, np.int64), I64)

    # -- weights (external data, written as they come) ------------------------------------------
    def param(self, arr_or_chunks, shape=None, dtype: int | None = None, name: str | None = None) -> Value:
        """A weight tensor: an array, or an iterable of fp32 row blocks with `shape` given."""
        dtype = self.dtype if dtype is None else dtype
        target = NP[dtype]
        pos = self._data.tell()
        pad = (-pos) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            pos += pad
        if isinstance(arr_or_chunks, np.ndarray):
            shape = arr_or_chunks.shape
            chunks = [arr_or_chunks]
        else:
            chunks = arr_or_chunks
        for c in chunks:
            self._data.write(memoryview(np.ascontiguousarray(c, dtype=target)).cast("B"))
        length = self._data.tell() - pos
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(target).itemsize
        if length != expected:
            raise ValueError(f"{self.name}: weight {name} wrote {length} bytes for shape {shape}")
        self.weight_bytes += length
        t = TensorProto()
        t.name = name or self._fresh("w")
        t.data_type = dtype
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(pos)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return Value(self, t.name, dtype)

    # -- shape helpers ---------------------------------------------------------------------------
    def reshape(self, v: Value, shape) -> Value:
        if isinstance(shape, Value):
            return self.op("Reshape", v, shape)
        return self.op("Reshape", v, self.ints(list(shape)))

    def shape(self, v: Value, start: int = 0, end: int | None = None) -> Value:
        attrs = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", v, dtype=I64, **attrs)

    def concat(self, vals, axis: int) -> Value:
        vals = [v if isinstance(v, Value) else self.ints(v) for v in vals]
        return self.op("Concat", *vals, axis=axis)

    def slice(self, v: Value, start: int, end: int, axis: int) -> Value:
        return self.op("Slice", v, self.ints([start]), self.ints([end]), self.ints([axis]))

    def split(self, v: Value, n: int, axis: int):
        return self.op("Split", v, axis=axis, num_outputs=n, outputs=n)

    def unsqueeze(self, v: Value, axes) -> Value:
        return self.op("Unsqueeze", v, self.ints(list(axes)))

    def mean(self, v: Value, axes, keepdims: bool = True) -> Value:
        return self.op("ReduceMean", v, self.ints(list(axes)), keepdims=int(keepdims))

    def slice_at(self, v: Value, start: Value, end: Value, axis: int) -> Value:
        """v[start:end] along `axis`, the bounds [1] int64 tensors computed in the graph."""
        return self.op("Slice", v, start, end, self.ints([axis]))

    def columns(self, row: Value, n: int) -> list:
        """The first n entries of a loop's table row, each a [1] tensor (bounds for slice_at)."""
        return [self.slice(row, j, j + 1, 0) for j in range(n)]

    # -- control flow ----------------------------------------------------------------------------
    def loop_rows(self, table: Value, init: list, body) -> list:
        """A Loop over the rows of an int64 `table` [K, cols]: `body(row, *carried)` builds the
        next carried values from row [cols] and the current ones (their shapes may change from
        one row to the next). Returns the final carried values. Values of this graph may be read
        in the body (ONNX's outer scope); ONNX Runtime frees each pass's temporaries before the
        next, which is what bounds a windowed decoder's memory."""
        saved = self.nodes, self.inputs, self.outputs
        self.nodes, self.inputs, self.outputs = [], [], []
        try:
            i = self.input(self._fresh("iter"), I64, [])
            cond = self.input(self._fresh("cond"), BOOL, [])
            carried = [self.input(self._fresh("carried"), v.dtype, None) for v in init]
            row = self.op("Gather", table, i, axis=0)
            outs = [cond] + list(body(row, *carried))
            for v in outs:  # every body output is a node output of the body, with its own name
                o = self.op("Identity", v)
                self.outputs.append(helper.make_tensor_value_info(o.name, o.dtype, None))
            graph = helper.make_graph(self.nodes, self._fresh("body"), self.inputs, self.outputs)
        finally:
            self.nodes, self.inputs, self.outputs = saved
        count = self.op("Squeeze", self.shape(table, 0, 1), self.ints([0]))
        res = self.op("Loop", count, None, *init, outputs=len(init), body=graph)
        res = [res] if len(init) == 1 else res
        for r, v in zip(res, init):
            r.dtype = v.dtype
        return res

    # -- common math -----------------------------------------------------------------------------
    def silu(self, x: Value) -> Value:
        return x * self.op("Sigmoid", x)

    def relu(self, x: Value) -> Value:
        return self.op("Relu", x)

    def gelu(self, x: Value) -> Value:
        """Exact (erf) GELU."""
        return 0.5 * x * (1.0 + self.op("Erf", x * float(1 / np.sqrt(2.0))))

    def rsqrt(self, x: Value) -> Value:
        return self.op("Reciprocal", self.op("Sqrt", x))

    def where(self, cond: Value, a, b) -> Value:
        ref = a if isinstance(a, Value) else b
        a = a if isinstance(a, Value) else self.const(a, ref.dtype)
        b = b if isinstance(b, Value) else self.const(b, ref.dtype)
        return self.op("Where", cond, a, b, dtype=ref.dtype)

    def softmax(self, x: Value, axis: int = -1) -> Value:
        return self.op("Softmax", x, axis=axis)

    def linear(self, x: Value, w: Value, b: Value | None = None) -> Value:
        """x @ w (+ b); `w` is stored [in, out] (the checkpoint's [out, in] transposed at write)."""
        y = self.op("MatMul", self.cast(x, w.dtype), w)
        return y if b is None else y + b

    # -- save ------------------------------------------------------------------------------------
    def _write(self, name: str, doc: str) -> Path:
        if not self._data.closed:
            self._data.flush()
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="lofi_cuda.build", doc_string=doc)
        model.ir_version = 8  # readable by every ONNX Runtime the extras allow (>= 1.18)
        path = self.folder / f"{name}.onnx"
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
        return path

    def save_variant(self, name: str, doc: str = "") -> dict:
        """Write the graph built so far as `<name>.onnx` over the same data file, then start
        another graph: the weights written so far serve both (one copy on disk)."""
        path = self._write(name, doc)
        self.nodes, self.inputs, self.outputs = [], [], []
        return {"file": path.name, "external_data": self.data_name, "weight_bytes": self.weight_bytes}

    def save(self, doc: str = "") -> dict:
        """Write `<name>.onnx` beside its data file; returns the manifest entry."""
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        path = self._write(self.name, doc)
        spec = {"file": path.name, "external_data": self.data_name, "weight_bytes": self.weight_bytes}
        if self.weight_map:
            spec["weights"] = dict(self.weight_map)
        return spec

    def abandon(self) -> None:
        if not self._data.closed:
            self._data.close()

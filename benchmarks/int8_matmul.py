"""ONNX Runtime's int8 GEMM against its fp32 GEMM at the DiT feed-forward's shape (issue 16).

    python benchmarks/int8_matmul.py [--rows 214] [--k 2560] [--n 12800] [--threads 1 2]

One MatMul with a constant weight, fp32, against the dynamic int8 form lofi_cuda.quantize writes
(DynamicQuantizeLinear + MatMulInteger, int8 per output column; ONNX Runtime fuses it into
DynamicQuantizeMatMul): median of 7 runs after a warm-up, in GFLOP/s (2·M·K·N per run). int8
pays off only where the CPU has dot-product instructions for it (VNNI); the CPU's flags are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _graph(nodes, inits, m, k, n) -> bytes:
    from onnx import TensorProto, helper
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def main() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=214, help="batch 2 x 107 frames (10 s)")
    ap.add_argument("--k", type=int, default=2560)
    ap.add_argument("--n", type=int, default=12800)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    m, k, n = a.rows, a.k, a.n
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    fp32 = _graph([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], m, k, n)
    int8 = _graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                   helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["yi"]),
                   helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
                   helper.make_node("Mul", ["xs", "sc"], ["s"]), helper.make_node("Mul", ["yf", "s"], ["y"])],
                  [numpy_helper.from_array(np.rint(w / scale).astype(np.int8), "wq"),
                   numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(scale, "sc")],
                  m, k, n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("flags")), [])
        print("CPU flags:", " ".join(f for f in flags if "avx" in f or "vnni" in f or "amx" in f))
    for threads in a.threads:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        for name, model in (("fp32", fp32), ("int8", int8)):
            s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            s.run(None, {"x": x})
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(f"{threads} thread(s) {name}: {t * 1e3:.1f} ms, {2 * m * k * n / t / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()

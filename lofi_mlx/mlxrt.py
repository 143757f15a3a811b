"""Import point for mlx.core. On Linux CPU builds, route cblas_*gemm to OpenBLAS first.

mlx[cpu] on Linux links a reference BLAS that runs f32 matmul/conv ~30x slower than OpenBLAS.
The PyPI `scipy-openblas32` wheel exports its symbols with a `scipy_` prefix, so a three-function
C shim (compiled once, cached) re-exports them under the `cblas_` names and is loaded with
RTLD_GLOBAL before mlx, which makes the dynamic linker bind mlx to it. Set LOFI_NO_OPENBLAS=1 to
skip. Without a C compiler it silently keeps mlx's own BLAS (slower, same results).

A few-row product against a weight matrix (x @ W.T with M <= SMALL_M rows: MusicGen's decoder
step, 2 rows) skips OpenBLAS: its sgemm packs all of W each call, about twice the memory traffic
of reading W once, which is what the shim's own loop does (one thread; the op is memory-bound).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SHIM = r"""
typedef int I; typedef float F; typedef double D;
#define DECL(name, T, S) \
  extern void scipy_##name(I,I,I,I,I,I,S,const T*,I,const T*,I,S,T*,I); \
  void name(I o,I ta,I tb,I m,I n,I k,S al,const T*a,I la,const T*b,I lb,S be,T*c,I lc) \
  { scipy_##name(o,ta,tb,m,n,k,al,a,la,b,lb,be,c,lc); }
DECL(cblas_dgemm, D, D)
extern void scipy_cblas_sgemm(I,I,I,I,I,I,F,const F*,I,const F*,I,F,F*,I);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(NO_CLONES)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static void few_rows(I m, I n, I k, F al, const F*a, I la, const F*b, I lb, F be, F*c, I lc)
{
  /* four rows of b at a time: four independent sums keep the FMA units busy */
  for (I j = 0; j < n; j += 4) {
    I nj = n - j < 4 ? n - j : 4;
    const F *b0 = b + (long)j * lb, *b1 = nj > 1 ? b0 + lb : b0,
            *b2 = nj > 2 ? b0 + 2L * lb : b0, *b3 = nj > 3 ? b0 + 3L * lb : b0;
    for (I i = 0; i < m; i++) {
      const F *ai = a + (long)i * la;
      F s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      #pragma omp simd reduction(+:s0,s1,s2,s3)
      for (I t = 0; t < k; t++) {
        F x = ai[t];
        s0 += x * b0[t]; s1 += x * b1[t]; s2 += x * b2[t]; s3 += x * b3[t];
      }
      F s[4] = {s0, s1, s2, s3};
      for (I q = 0; q < nj; q++) {
        F *o = c + (long)i * lc + j + q;
        *o = be == 0 ? al * s[q] : al * s[q] + be * *o;
      }
    }
  }
}
void cblas_sgemm(I o,I ta,I tb,I m,I n,I k,F al,const F*a,I la,const F*b,I lb,F be,F*c,I lc)
{
  if (o == 101 && ta == 111 && tb == 112 && m <= SMALL_M)
    few_rows(m, n, k, al, a, la, b, lb, be, c, lc);
  else
    scipy_cblas_sgemm(o,ta,tb,m,n,k,al,a,la,b,lb,be,c,lc);
}
extern void scipy_cblas_cgemm(I,I,I,I,I,I,const void*,const void*,I,const void*,I,const void*,void*,I);
void cblas_cgemm(I o,I ta,I tb,I m,I n,I k,const void*al,const void*a,I la,const void*b,I lb,
                 const void*be,void*c,I lc)
{ scipy_cblas_cgemm(o,ta,tb,m,n,k,al,a,la,b,lb,be,c,lc); }
"""

SMALL_M = 4
BLAS = "mlx"
_OPENBLAS = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lofi.nvim" / "shim"


def _preload_openblas() -> str:
    if sys.platform != "linux" or os.environ.get("LOFI_NO_OPENBLAS"):
        return "mlx"
    try:
        import scipy_openblas32
    except ImportError:
        return "mlx"
    libdir = Path(scipy_openblas32.get_lib_dir())
    lib = libdir / f"lib{scipy_openblas32.get_library()}.so"
    if not lib.is_file():
        return "mlx"
    tag = hashlib.sha256((_SHIM + str(lib) + str(SMALL_M)).encode()).hexdigest()[:12]
    shim = _cache_dir() / f"lofi_cblas_{tag}.so"
    if not shim.is_file():
        shim.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as td:
            src = Path(td) / "shim.c"
            src.write_text(_SHIM)
            tmp = Path(td) / shim.name
            cc = os.environ.get("CC", "cc")
            for extra in ([], ["-DNO_CLONES"]):  # a compiler without target_clones: one plain build
                try:
                    subprocess.run([cc, "-O3", "-fopenmp-simd", f"-DSMALL_M={SMALL_M}", *extra,
                                    "-shared", "-fPIC", str(src), "-o", str(tmp),
                                    f"-L{libdir}", f"-l{scipy_openblas32.get_library()}",
                                    f"-Wl,-rpath,{libdir}"],
                                   check=True, capture_output=True, timeout=120)
                    break
                except (OSError, subprocess.SubprocessError):
                    continue
            else:
                return "mlx"
            os.replace(tmp, shim)  # atomic: concurrent processes never see half a library
    global _OPENBLAS
    try:
        _OPENBLAS = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return "mlx"
    return "openblas"


def set_threads(n: int | None) -> None:
    """Threads for the BLAS behind MLX's CPU matmuls (the only threaded part we control)."""
    if n and _OPENBLAS is not None:
        _OPENBLAS.scipy_openblas_set_num_threads(int(n))


if "mlx.core" not in sys.modules:
    BLAS = _preload_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

__all__ = ["mx", "nn", "BLAS", "set_threads"]

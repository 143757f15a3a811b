"""`python -m lofi_cuda.verify GOLDEN_DIR`: the ONNX engine against a reference golden set.

The same contract and code as `lofi.verify` (every golden in the set's manifest, one line
per check with its error and tolerance, exit 0 only if all pass), driving the ONNX engine.
Options: --precision fp32|fp16, --device auto|cpu|gpu, --only PREFIX...
"""

import sys

from lofi.verify import main as _main
from lofi.verify import run  # noqa: F401  (re-exported for callers and tests)


def main(argv=None) -> int:
    return _main(argv, engine_name="onnx")


if __name__ == "__main__":
    sys.exit(main())

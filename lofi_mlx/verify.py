"""`python -m lofi_mlx.verify GOLDEN_DIR`: the MLX engine against a reference golden set (see lofi.verify)."""

import sys

from lofi.verify import main as _main


def main(argv=None) -> int:
    return _main(argv, engine_name="mlx")


if __name__ == "__main__":
    sys.exit(main())

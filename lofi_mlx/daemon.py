"""`python -m lofi_mlx.daemon`: the old name of `python -m lofi.daemon`, kept for existing configs."""

if __name__ == "__main__":
    import sys

    from lofi.daemon.__main__ import main
    sys.exit(main())

"""``python -m benchmarks.zo_bench ...``: the same program as ``zo-bench`` (the memory workers run this way)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

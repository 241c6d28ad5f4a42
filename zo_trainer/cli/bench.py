"""``zo-bench``: the benchmarks' console script. The suites are the checkout's ``benchmarks/zo_bench`` package, which
is not part of the wheel: this module finds it and hands it the command line (``benchmarks/zo_bench/cli.py``).

Where it looks: ``$ZO_BENCH_CHECKOUT`` if set (only there), else the folder above the ``zo_trainer`` package (an
editable install, ``pip install -e .``), then the current directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHECKOUT_ENV = "ZO_BENCH_CHECKOUT"
NOT_FOUND = (
    "zo-bench: error: zo-bench runs from a source checkout (benchmarks/ is not in the wheel): clone the zo_trainer "
    "repository, `bash scripts/setup.sh` (or `pip install -e '.[bench]'`) there, and run zo-bench from it"
)


def find_checkout() -> Path | None:
    """The checkout whose ``benchmarks/zo_bench`` package zo-bench runs, or None."""
    override = os.environ.get(CHECKOUT_ENV)
    candidates = [Path(override)] if override else [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        if (root / "benchmarks" / "zo_bench" / "cli.py").is_file():
            return root.resolve()
    return None


def main(argv: list[str] | None = None) -> int:
    """The ``zo-bench`` console script: the benchmark's exit status; 2 with one line when there is no checkout."""
    root = find_checkout()
    if root is None:
        print(NOT_FOUND, file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.zo_bench.cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())

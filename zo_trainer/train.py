"""``python -m zo_trainer.train``: the ``zo-train`` program, kept at the path the README documents.

The program lives in ``zo_trainer.cli.train``; this shim only re-exports it.
"""

import sys

from zo_trainer.cli.train import ModelArguments, load_model, main, parse_args, run  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

"""``python -m zo_trainer.run SCRIPT.py [args]``: the same program as ``zo-run`` (see ``zo_trainer.cli.launch``)."""

import sys

from zo_trainer.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())

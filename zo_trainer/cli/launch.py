"""``zo-run``: run an unmodified Hugging Face training script with zeroth-order optimizers available.

    zo-run run_clm.py --model_name_or_path ... --optim sparse_mezo --zo_eps 1e-3 --output_dir out
    python -m zo_trainer.run run_clm.py ...                                   # the same program
    torchrun --nproc_per_node 2 -m zo_trainer.run run_clm.py ...              # data parallel
    zo-run -m some.package.train_module ...                                   # a module instead of a file

Like ``torchrun`` / ``accelerate launch``: everything after the script is the script's own command line. Before the
script runs (as ``__main__``, via ``runpy``), ``zo_trainer.enable()`` makes the ``Trainer`` and
``TrainingArguments`` it imports ZO-aware (see ``zo_trainer.patch``), so its ``HfArgumentParser`` accepts
``--optim mezo|sparse_mezo|qzo`` and the ``--zo_*`` flags. With a first-order ``--optim`` the script runs as under
plain ``python``. The exit status is the script's.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = """usage: zo-run SCRIPT.py [script arguments ...]
       zo-run -m MODULE [script arguments ...]
       python -m zo_trainer.run SCRIPT.py [script arguments ...]

Runs a Hugging Face training script unmodified, with --optim mezo | sparse_mezo | qzo and the --zo_* flags
accepted by its TrainingArguments and its Trainer running the zeroth-order step. Data parallel:
  torchrun --nproc_per_node N -m zo_trainer.run SCRIPT.py ...
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(f"zo-run (zo_trainer {__version__})")
        return 0
    as_module = argv[0] == "-m"
    if as_module:
        if len(argv) < 2:
            print("zo-run: error: -m needs a module name\n" + USAGE, end="", file=sys.stderr)
            return 2
        target, script_args = argv[1], argv[2:]
    else:
        target, script_args = argv[0], argv[1:]
        if target.startswith("-"):
            print(f"zo-run: error: unknown option {target}; the script comes first\n" + USAGE, end="", file=sys.stderr)
            return 2
        if not os.path.isfile(target):
            print(f"zo-run: error: script {target!r} not found", file=sys.stderr)
            return 2

    from ..patch import enable

    enable()
    if as_module:
        sys.argv = [target, *script_args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        # As `python script.py` would: argv[0] is the script, its folder leads sys.path (for its sibling imports).
        sys.argv = [target, *script_args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One clear line for the console scripts: ``zo-train: error: <what is wrong>`` and an exit code that means something.

    0  success (nothing printed beyond the logs)
    2  usage error: bad flags, config file, data files, model path, output directory, Hub unreachable
    1  runtime failure: the run started and could not finish (non-finite weights, disk full, ...)

A mistake in the input is reported as one line, without a traceback; ``--debug`` (or ``ZO_TRAINER_DEBUG=1``)
shows the traceback as well. Anything else (``TypeError``, ``KeyError``, ... : a bug) keeps its full traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_ENV = "ZO_TRAINER_DEBUG"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Something the user passed is wrong (flags, config, data, paths): exit status 2, one line."""

    exit_code = EXIT_USAGE


class RunFailure(RuntimeError):
    """The run started and cannot go on for a reason the user can act on: exit status 1, one line."""

    exit_code = EXIT_FAILURE


def _input_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that, raised while reading the user's input, mean the input is wrong (not a bug)."""
    types: list[type[BaseException]] = [ValueError, OSError, ImportError]
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _runtime_error_types() -> tuple[type[BaseException], ...]:
    """Failures during a run that are explained by their message (no traceback needed)."""
    from ..optim import NonFiniteLossError

    return (NonFiniteLossError, RunFailure, OSError)


def one_line(error: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    lines = [re.sub(r"^\s*(- )?", "", line).rstrip() for line in text.splitlines()]  # Drop "  - " bullets.
    return "; ".join(line for line in lines if line).replace(":;", ":")


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` with no value (HF's ``--debug underflow_overflow`` keeps its meaning) or ``ZO_TRAINER_DEBUG=1``."""
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    kept = []
    for index, arg in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg == "--debug" and not (following or "").startswith(("underflow_overflow", "tpu_metrics_debug")):
            debug = True
            continue
        kept.append(arg)
    return debug, kept


def run_console_script(
    prog: str,
    body: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    input_stage: Callable[[], bool] | None = None,
) -> int:
    """Run ``body(argv)`` as the console script ``prog``; returns its exit status (0, 1 or 2).

    ``input_stage()`` says whether the program is still reading its input (arguments, config, data, model):
    a ``ValueError``/``OSError`` then means bad input (exit 2). Later only ``NonFiniteLossError``, ``RunFailure``
    and ``OSError`` (disk full, permissions) are one-line failures (exit 1); anything else is a bug and keeps
    its traceback.
    """
    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        result = body(args)
        # A body may return its own exit status (an int); metrics, paths and None mean success.
        return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK
    except SystemExit:
        raise  # argparse's own exit (--help, or an error it already printed).
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - classified below; bugs are re-raised
        reading_input = input_stage() if input_stage is not None else True
        if isinstance(error, (UsageError, RunFailure)):
            code = error.exit_code
        elif reading_input and isinstance(error, _input_error_types()):
            code = EXIT_USAGE
        elif isinstance(error, _runtime_error_types()):
            code = EXIT_FAILURE
        else:
            raise  # A bug: the traceback is what a maintainer needs.
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return code


def usage_errors_in_one_line(parser, prog: str) -> None:
    """Make an argparse parser report a bad flag as ``<prog>: error: ...`` (one line, exit 2) without the usage dump."""

    def error(message: str):
        raise UsageError(f"{message} (see {prog} --help)")

    parser.error = error

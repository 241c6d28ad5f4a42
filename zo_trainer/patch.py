"""``zo_trainer.enable()``: unmodified Hugging Face training scripts accept ``--optim mezo|sparse_mezo|qzo``.

Design. A script reaches the Trainer through names: ``from transformers import Trainer, TrainingArguments``,
``transformers.Seq2SeqTrainer``, ``HfArgumentParser((ModelArguments, TrainingArguments))``. ``enable()`` rebinds
those names, in the modules scripts import them from, to ZO-aware classes:

- ``TrainingArguments`` -> ``ZOTrainingArguments`` (adds the ZO ``--optim`` choices and the ``--zo_*`` flags);
  an argument class derived from it (``Seq2SeqTrainingArguments``, TRL's ``SFTConfig``) -> a dataclass deriving
  from both, e.g. ``ZOSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, ZOTrainingArguments)``.
- ``Trainer`` -> ``ZOTrainer``; a Trainer subclass (``Seq2SeqTrainer``, TRL's ``SFTTrainer``) ->
  ``ZOSeq2SeqTrainer(Seq2SeqTrainer, ZOTrainer)``: cooperative ``super()`` puts ZOTrainer's step between the
  subclass and HF's Trainer. A subclass the script defines itself, after the rebinding, derives from ZOTrainer.

Why not patch ``Trainer``'s methods in place: ``ZOTrainer`` is a subclass whose overrides call ``super()``; the same
methods spliced into ``Trainer`` would have no HF version left to call, and every HF Trainer in the process would
change. Rebinding names touches nothing that was already built and is undone by ``disable()``.

First-order runs stay HF's: with an HF ``--optim`` every ``ZOTrainer`` override hands over to ``Trainer`` unchanged
(tested: the same weights, bit for bit, as the script run with plain ``python``); the arguments gain only the
unused ``zo_*`` fields. Only classes are rebound; HF's own modules keep using their original classes internally.

Code imported after ``enable()`` that subclasses ``transformers.Trainer`` / ``TrainingArguments`` (a library's own
trainer, a script's ``class MyTrainer(Trainer)``) derives from the ZO classes directly.

``zo-run script.py ...`` (``zo_trainer.cli.launch``) calls ``enable()`` and runs the script as ``__main__``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
from typing import Any

from transformers import Trainer, TrainingArguments

from .trainer import ZOTrainer
from .training_args import ZOTrainingArguments

__all__ = ["disable", "enable", "is_enabled", "zo_arguments_class", "zo_trainer_class"]

# (module, attribute) pairs rebound by enable(). trl only if already imported (see _module).
_TARGETS: tuple[tuple[str, str], ...] = (
    ("transformers", "TrainingArguments"),
    ("transformers.training_args", "TrainingArguments"),
    ("transformers", "Seq2SeqTrainingArguments"),
    ("transformers.training_args_seq2seq", "Seq2SeqTrainingArguments"),
    ("transformers", "Trainer"),
    ("transformers.trainer", "Trainer"),
    ("transformers", "Seq2SeqTrainer"),
    ("transformers.trainer_seq2seq", "Seq2SeqTrainer"),
    ("trl", "SFTConfig"),
    ("trl.trainer.sft_config", "SFTConfig"),
    ("trl", "SFTTrainer"),
    ("trl.trainer.sft_trainer", "SFTTrainer"),
)

_lock = threading.Lock()
_originals: dict[tuple[str, str], Any] = {}  # What enable() replaced, for disable().
_variants: dict[type, type] = {}  # Original class -> its ZO variant, built once per process.


def zo_arguments_class(cls: type) -> type:
    """The ZO variant of a ``TrainingArguments`` class: its own fields plus ``optim`` = ZO names and ``--zo_*``."""
    if issubclass(cls, ZOTrainingArguments):
        return cls
    if cls is TrainingArguments:
        return ZOTrainingArguments
    if cls not in _variants:
        _variants[cls] = dataclasses.dataclass(_new_class(cls, ZOTrainingArguments))
    return _variants[cls]


def zo_trainer_class(cls: type) -> type:
    """The ZO variant of a ``Trainer`` class: ``cls`` with ``ZOTrainer`` between it and HF's ``Trainer``."""
    if issubclass(cls, ZOTrainer):
        return cls
    if cls is Trainer:
        return ZOTrainer
    if cls not in _variants:
        _variants[cls] = _new_class(cls, ZOTrainer)
    return _variants[cls]


def _new_class(cls: type, zo_base: type) -> type:
    """``ZO<name>(cls, zo_base)``, importable as ``zo_trainer.patch.ZO<name>`` so that pickle finds it again
    (Trainer saves its arguments with ``torch.save`` into every checkpoint as ``training_args.bin``)."""
    name = f"ZO{cls.__name__}"
    return type(name, (cls, zo_base), {"__module__": __name__, "__qualname__": name, "__doc__": cls.__doc__})


def __getattr__(name: str) -> type:
    """``ZO<name>`` for a class of ``_TARGETS``, built on first use: unpickling ``training_args.bin`` in a process
    that has not called ``enable()`` (``torch.load`` of a checkpoint's arguments) finds the class here."""
    for module_name, attribute in _TARGETS:
        if name == f"ZO{attribute}":
            original = _originals.get((module_name, attribute))
            if original is None:
                try:
                    original = getattr(importlib.import_module(module_name), attribute)
                except (ImportError, AttributeError):
                    continue
            return _variant(original)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _variant(obj: Any) -> Any:
    if isinstance(obj, type) and issubclass(obj, TrainingArguments):
        return zo_arguments_class(obj)
    if isinstance(obj, type) and issubclass(obj, Trainer):
        return zo_trainer_class(obj)
    return obj


def _module(name: str):
    top = name.partition(".")[0]
    if top != "transformers" and top not in sys.modules:
        # Not imported yet: when it is, its classes subclass the rebound transformers names and so are ZO-aware
        # already; importing it here would only slow every launch down (trl takes seconds).
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - an optional integration that does not import here (trl vs another transformers).
        return None


def enable() -> None:
    """Make ``Trainer``, ``TrainingArguments`` (and their HF / TRL subclasses) ZO-aware for code imported from now on.

    Idempotent. Call it before the script or notebook cell that does ``from transformers import Trainer, ...``:
    names already bound by an earlier import keep the original classes.
    """
    with _lock:
        # Import every target module before rebinding any name: a module imported later (trainer_seq2seq) would
        # otherwise build its classes on the rebound ones and keep them after disable().
        found = {}
        for module_name, attribute in _TARGETS:
            module = _module(module_name) if (module_name, attribute) not in _originals else None
            if module is not None and hasattr(module, attribute):
                found[(module_name, attribute)] = (module, getattr(module, attribute))
        for key, (module, original) in found.items():
            _originals[key] = original
            setattr(module, key[1], _variant(original))


def disable() -> None:
    """Undo ``enable()``: the original classes are bound again (objects already built keep their class)."""
    with _lock:
        for (module_name, attribute), original in _originals.items():
            setattr(sys.modules[module_name], attribute, original)
        _originals.clear()


def is_enabled() -> bool:
    return bool(_originals)

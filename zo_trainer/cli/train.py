"""``zo-train``: fine-tune a causal LM on a SuperGLUE task with ZO (or first-order) optimization.

    zo-train --task rte --optim sparse_mezo --max_steps 1000 --output_dir out
    zo-train configs/rte_sparse_mezo.yaml [--flag value ...]     # a config file; flags after it override it
    python -m zo_trainer.train ...                                # the same program (a shim over this module)

Every ``TrainingArguments`` flag works as usual. MeZO's protocol: ``--num_train`` examples for training
and ``--num_dev`` for model selection, both sampled from the train split with ``--data_seed``; the
task's validation split (``--num_eval`` examples) is the test set, reported as ``test_accuracy``.

Exit status: 0 on success, 2 for bad input (one line ``zo-train: error: ...``; ``--debug`` adds the traceback),
1 for a run that started and failed. From Python, ``run(argv)`` returns the metrics and raises instead.
One run per ``--output_dir`` (a lock file); a directory holding an earlier run needs ``--resume_from_checkpoint``
or ``--overwrite_output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, TrainerCallback, set_seed

from ..data import CandidateCollator, compute_accuracy, load_task_splits, prepare_dataset
from ..models import ModelArguments, load_model, lora_config
from ..tasks import TASKS, get_task
from ..trainer import ZOTrainer, checkpoint_folders
from ..training_args import ZOTrainingArguments
from .errors import UsageError, run_console_script, usage_errors_in_one_line

logger = logging.getLogger("zo_trainer")


@dataclass
class DataArguments:
    task: str = field(default="rte", metadata={"help": f"Task: one of {sorted(TASKS)}."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with SuperGLUE jsonl (train.jsonl, val.jsonl). Default: the Hub (aps/super_glue)."},
    )
    num_train: int = field(default=1000, metadata={"help": "Training examples sampled from the train split."})
    num_dev: int = field(default=500, metadata={"help": "Dev examples (model selection), disjoint from train."})
    num_eval: int = field(
        default=1000, metadata={"help": "Test examples from the validation split (capped at its size)."}
    )
    max_length: int = field(
        default=256, metadata={"help": "Max tokens of prompt + answer; longer prompts are cut on the left."}
    )
    eval_zero_shot: bool = field(default=False, metadata={"help": "Also evaluate the test set before training."})


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an --output_dir that holds an earlier run: its checkpoint-* folders are deleted. "
            "Without it such a directory is refused (unless --resume_from_checkpoint continues the run)."
        },
    )


def _config_to_argv(path: str) -> list[str]:
    """A YAML/JSON config as command-line flags, so flags given after it override it."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist (run from the folder it is relative to?)")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text) or {}
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError: its message names the line and column.
        raise UsageError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values, got {type(config).__name__}.")
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ZOTrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        argv = _config_to_argv(argv[0]) + argv[1:]
    if "--output_dir" not in argv:
        argv += ["--output_dir", "zo_output"]
    parser = HfArgumentParser((ModelArguments, DataArguments, ZOTrainingArguments, RunArguments))
    parser.prog = "zo-train"
    usage_errors_in_one_line(parser, "zo-train")
    model_args, data_args, training_args, run_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.overwrite_output_dir = run_args.overwrite_output_dir  # Not a TrainingArguments field in HF 5.
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in ("true", "last", "yes", "1"):
        training_args.resume_from_checkpoint = True  # HF passes the string: the last complete checkpoint.
    elif isinstance(resume, str) and resume.strip().lower() in ("", "false", "no", "none", "0"):
        training_args.resume_from_checkpoint = None
    # zo-train trains and evaluates unless told otherwise. HF turns do_eval on by itself whenever
    # eval_strategy != "no", so do_train must not be inferred from the other do_* flags.
    if not any(arg.split("=")[0] == "--do_train" for arg in argv):
        training_args.do_train = True
    if not any(arg.split("=")[0] == "--do_eval" for arg in argv):
        training_args.do_eval = True
    if model_args.quantization and training_args.optim != "qzo" and not model_args.use_peft:
        logger.warning(
            "--quantization %s with --optim %s: only qzo trains 4-bit models (or add --use_peft: LoRA on the "
            "4-bit base, QLoRA).",
            model_args.quantization,
            training_args.optim,
        )
    check_peft_args(model_args, training_args, argv)
    return model_args, data_args, training_args


def check_peft_args(model_args: ModelArguments, training_args: ZOTrainingArguments, argv: list[str]) -> None:
    """``--use_peft`` and the ``--lora_*`` flags, checked before the data and the model load."""
    if not model_args.use_peft:
        given = sorted({arg.split("=")[0] for arg in argv if arg.startswith("--lora_")})
        if given:
            logger.warning("%s without --use_peft: ignored (the model's own weights are trained).", ", ".join(given))
        return
    if training_args.optim == "qzo":
        raise UsageError(
            "--optim qzo with --use_peft: qzo trains the quantization scales of the 4-bit base model, which a PEFT "
            "adapter cannot save or reload; to train LoRA adapters (also on a 4-bit base: --quantization nf4, "
            "QLoRA) use --optim mezo or sparse_mezo, or run qzo without --use_peft"
        )
    try:
        lora_config(model_args)
    except (ImportError, ValueError) as error:
        raise UsageError(str(error)) from None


LOCK_NAME = ".zo_train.lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process: alive.
    return True


@contextlib.contextmanager
def claim_output_dir(output_dir: str) -> Iterator[str]:
    """Create ``output_dir`` (checking it is writable, before the slow model load) and hold ``.zo_train.lock`` in it.

    One run per directory: the lock file names the run holding it (pid, host, start time, command). A lock left by
    a process of this host that no longer exists (killed run) is taken over with a warning.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --output_dir {output_dir}: {e.strerror or e}") from None
    lock = os.path.join(output_dir, LOCK_NAME)
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                other = json.loads(Path(lock).read_text())
            except (OSError, ValueError):
                other = {}
            pid, host = other.get("pid"), other.get("host")
            if host == mine["host"] and isinstance(pid, int) and not _process_alive(pid):
                logger.warning("%s: taking over the lock of run pid %s, which no longer exists.", output_dir, pid)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            raise UsageError(
                f"--output_dir {output_dir} is in use by another zo-train run (pid {pid} on {host}, started "
                f"{other.get('started', '?')}): wait for it to finish, choose another --output_dir, or delete {lock} "
                "if that run is gone"
            ) from None
        except OSError as e:
            raise UsageError(f"--output_dir {output_dir} is not writable: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(mine, handle)
        break
    else:
        raise UsageError(f"could not take the lock {lock} (another run keeps recreating it)")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(Path(lock).read_text()).get("pid") == mine["pid"]:
                os.unlink(lock)


def check_output_dir(training_args: ZOTrainingArguments) -> None:
    """A directory holding an earlier run is refused unless resuming it or --overwrite_output_dir starts over."""
    output_dir = training_args.output_dir
    if not training_args.do_train or training_args.resume_from_checkpoint or not os.path.isdir(output_dir):
        return
    checkpoints = checkpoint_folders(output_dir)
    finished = os.path.isfile(os.path.join(output_dir, "trainer_state.json"))
    if not checkpoints and not finished:
        return
    found = ", ".join(os.path.basename(c) for c in checkpoints[-3:]) or "trainer_state.json of a finished run"
    if not getattr(training_args, "overwrite_output_dir", False):
        raise UsageError(
            f"--output_dir {output_dir} already holds a run ({found}): pass --resume_from_checkpoint true to continue "
            "it, --overwrite_output_dir to start over (deletes its checkpoints), or choose another --output_dir"
        )
    if training_args.process_index == 0:
        for folder in checkpoints:
            shutil.rmtree(folder)
        if checkpoints:
            logger.warning("--overwrite_output_dir: deleted %d old checkpoint(s) in %s.", len(checkpoints), output_dir)


def check_run_length(training_args: ZOTrainingArguments) -> None:
    if not training_args.do_train:
        return
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.num_train_epochs <= 0):
        raise UsageError(
            f"--max_steps {training_args.max_steps} (num_train_epochs {training_args.num_train_epochs}) trains "
            "nothing: pass --max_steps N > 0 (or --do_train false to only evaluate)"
        )


ADAPTER_CONFIG = "adapter_config.json"
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "task_type", "bias")


def check_peft_resume(model, training_args: ZOTrainingArguments) -> None:
    """A resume must build the adapter the checkpoint holds: LoRA or not, and the same ``--lora_*`` settings.

    Otherwise HF's load fails with a tensor-shape traceback (another rank) or, worse, continues (another alpha).
    """
    resume = training_args.resume_from_checkpoint
    if not training_args.do_train or not resume:
        return
    from ..trainer import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(training_args.output_dir) if resume is True else resume
    if not checkpoint or not os.path.isdir(checkpoint):
        return  # ZOTrainer.train names the missing or incomplete checkpoint.
    saved_path = os.path.join(checkpoint, ADAPTER_CONFIG)
    configs = getattr(model, "peft_config", None)
    if not configs:
        if os.path.isfile(saved_path):
            raise UsageError(
                f"cannot resume from {checkpoint}: it holds LoRA adapters ({ADAPTER_CONFIG}); add --use_peft and "
                "its --lora_* settings"
            )
        return
    if not os.path.isfile(saved_path):
        raise UsageError(f"cannot resume from {checkpoint} with --use_peft: it holds no adapter ({ADAPTER_CONFIG})")
    saved = json.loads(Path(saved_path).read_text())
    now = configs["default"].to_dict()

    def comparable(value):
        return sorted(value) if isinstance(value, (set, frozenset, list, tuple)) else getattr(value, "value", value)

    differences = [
        f"{name} {comparable(saved.get(name))!r} in the checkpoint, {comparable(now.get(name))!r} now"
        for name in _LORA_FIELDS
        if comparable(saved.get(name)) != comparable(now.get(name))
    ]
    if differences:
        raise UsageError(
            f"cannot resume from {checkpoint}: its LoRA adapter has other settings: {'; '.join(differences)}. Resume "
            "with the checkpoint's --lora_* settings, or start a new run in another --output_dir"
        )


class _InputStage(TrainerCallback):
    """Marks the end of input checking: from the first step on, a ValueError is not the user's input any more."""

    reading_input = True

    def on_train_begin(self, args, state, control, **kwargs):
        _InputStage.reading_input = False


def _shut_down_process_group() -> None:
    """Tear the default process group down before the interpreter exits (also after an error).

    Left to interpreter shutdown, gloo's threads can be destroyed while still joinable and the process aborts with
    "terminate called without an active exception" (SIGABRT), after a run that succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def run(argv: list[str] | None = None) -> dict[str, float]:
    """The whole zo-train program from Python: returns the metrics; raises on bad input or a failed run."""
    try:
        return _run(argv)
    finally:
        _shut_down_process_group()


def _run(argv: list[str] | None = None) -> dict[str, float]:
    _InputStage.reading_input = True
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    check_run_length(training_args)

    # Everything about the data is checked before the (slow) model load and before any weight changes.
    task = get_task(data_args.task)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    try:
        splits = load_task_splits(
            task,
            data_args.data_dir,
            num_train=data_args.num_train,
            num_dev=data_args.num_dev,
            num_eval=data_args.num_eval,
            data_seed=data_seed,
        )
    except (OSError, ImportError) as e:
        if data_args.data_dir is not None:
            raise
        raise UsageError(
            f"could not load {task.name} from the Hugging Face Hub ({task.hub_path}, {task.hub_config}): "
            f"{' '.join(str(e).split())[:300]}. Offline? Pass --data_dir with the SuperGLUE jsonl files"
        ) from e

    check_output_dir(training_args)
    with contextlib.ExitStack() as stack:
        if training_args.process_index == 0:
            stack.enter_context(claim_output_dir(training_args.output_dir))
        return _train_and_evaluate(model_args, data_args, training_args, task, splits)


def _train_and_evaluate(model_args, data_args, training_args, task, splits) -> dict[str, float]:
    # LoRA adapters start from --seed: zo-replay rebuilds them from the base model and the trajectory.
    model, tokenizer = load_model(model_args, init_seed=training_args.seed)
    check_peft_resume(model, training_args)

    prepared = {
        name: prepare_dataset(tokenizer, task, split, data_args.max_length)
        for name, split in splits.items()
        if len(split)
    }
    trainer = ZOTrainer(
        model=model,
        args=training_args,
        train_dataset=prepared["train"] if training_args.do_train else None,
        eval_dataset=prepared.get("dev", prepared["eval"]),
        processing_class=tokenizer,
        data_collator=CandidateCollator(tokenizer),
        compute_metrics=compute_accuracy,
        callbacks=[_InputStage()],
    )

    metrics: dict[str, float] = {}
    if data_args.eval_zero_shot:
        metrics.update(trainer.evaluate(prepared["eval"], metric_key_prefix="zero_shot"))
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # Model + tokenizer, loadable with from_pretrained.
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    _InputStage.reading_input = False
    if training_args.do_eval:
        test_metrics = trainer.evaluate(prepared["eval"], metric_key_prefix="test")
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)
    if data_args.eval_zero_shot:
        trainer.save_metrics("zero_shot", {k: v for k, v in metrics.items() if k.startswith("zero_shot")})
    return metrics


def main(argv: list[str] | None = None) -> int:
    """The ``zo-train`` console script: exit status 0 on success, 2 for bad input, 1 for a failed run."""
    return run_console_script("zo-train", run, argv, input_stage=lambda: _InputStage.reading_input)


if __name__ == "__main__":
    sys.exit(main())

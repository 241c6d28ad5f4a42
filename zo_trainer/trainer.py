"""``ZOTrainer``: HF ``Trainer`` with zeroth-order optimizers wired in.

Only the step changes: ``training_step`` runs two forward passes per direction under ``no_grad`` and
records the projected gradient; ``ZOOptimizer.step()`` (called by HF's loop) applies the update.
HF keeps doing argument parsing, LR schedules, logging, evaluation, checkpointing and progress bars.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers import trainer as hf_trainer_module
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import CandidateCollator, candidate_loss
from .engine import ZOEngine
from .methods import ZOMethod, get_method
from .optim import NonFiniteLossError, ZOOptimizer, fingerprints_match, first_non_finite, weights_fingerprint
from .step import zo_step
from .training_args import ZOTrainingArguments
from .trajectory import TRAJECTORY_NAME, TrajectoryError, _json_float, load_trajectory, save_trajectory

logger = logging.getLogger(__name__)


class ZOCallback(TrainerCallback):
    """Fixes Sparse-MeZO thresholds before the first step (unless restored from a checkpoint)."""

    def __init__(self, engine: ZOEngine, method: ZOMethod):
        self.engine = engine
        self.method = method

    def on_train_begin(self, args, state, control, **kwargs):
        if self.method.sparsity > 0 and not self.engine.thresholds_fixed:
            self.engine.set_thresholds(self.method.sparsity, select=self.method.is_sparsified)
            logger.info(
                "%s: thresholds fixed for %d tensors at sparsity %.2f.",
                self.method.name,
                sum(t.threshold is not None for t in self.engine.targets),
                self.method.sparsity,
            )


class ZOTrajectoryCallback(TrainerCallback):
    """Fingerprints the base weights, checks data-parallel ranks agree, writes the trajectory at the end.

    (Checkpoints get theirs from ``ZOTrainer.save_model``, inside HF's checkpoint flow.)
    """

    def __init__(self, trainer: ZOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        optimizer = trainer._zo_optimizer()
        fingerprint = weights_fingerprint(trainer.zo_engine)
        if optimizer.base_fingerprint is None and state.global_step == 0:
            optimizer.base_fingerprint = fingerprint
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must start from the same weights and seed, or the shared update means nothing. One-off, 48 bytes.
            mine = torch.tensor([*fingerprint, float(args.seed)], dtype=torch.float64, device=args.device)
            both = torch.stack([mine, -mine])
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            highest, lowest = both[0].tolist(), (-both[1]).tolist()
            # Sums may differ in the last bits between devices (reduction order); the seed must match exactly.
            if highest[2] != lowest[2] or not fingerprints_match(highest[:2], lowest[:2], rel=1e-9):
                raise RuntimeError(
                    "Data-parallel ZO: the processes start from different weights or --seed (rank "
                    f"{dist.get_rank()}: fingerprint {fingerprint}, seed {args.seed}). Every rank must load the same "
                    "model (e.g. from_pretrained, or a fixed torch.manual_seed before building it) and use the same seed."
                )

    def on_train_end(self, args, state, control, **kwargs):
        save_trajectory(self.trainer, args.output_dir)


def _configure_zo_logging(args: ZOTrainingArguments) -> None:
    """zo_trainer's loggers follow the run's logging, as transformers' do: warnings once, from rank 0.

    Rank 0 logs at least as verbosely as the script asked for (``--log_level``, or the transformers verbosity a
    script sets, e.g. run_clm's ``set_verbosity_info()``); every other rank logs errors only.
    """
    zo_logger = logging.getLogger("zo_trainer")
    if args.process_index != 0:
        zo_logger.setLevel(logging.ERROR)
        return
    wanted = args.get_process_log_level()
    if wanted < zo_logger.getEffectiveLevel():
        zo_logger.setLevel(wanted)


def _requested_processes() -> tuple[int, str] | None:
    """(processes, launcher) that the launcher was asked for, where its environment or command line tells.

    ``accelerate launch --num_processes 2 --cpu`` (and any launch without ``--multi_gpu``) starts ONE process with
    ``ACCELERATE_USE_CPU`` set and no ``WORLD_SIZE``: the number asked for is only on the launcher's command line.
    """
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE"
    if "ACCELERATE_USE_CPU" not in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for index, word in enumerate(parent):
        for flag in ("--num_processes", "--num-processes"):
            value = word[len(flag) + 1 :] if word.startswith(flag + "=") else None
            if word == flag and index + 1 < len(parent):
                value = parent[index + 1]
            if value is not None and value.isdigit():
                return int(value), "accelerate launch --num_processes"
    return None


class ZOLayoutCallback(TrainerCallback):
    """One INFO line at train start naming the data-parallel layout (after the script has set up logging)."""

    def __init__(self, trainer: ZOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        world = args.world_size
        n = args.zo_num_perturbations
        global_batch = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
        if world > 1:
            backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "?"
            logger.info(
                "ZO data parallel: %d processes, backend %s, device %s; each optimizer step all-reduces %d bytes "
                "(%d projected gradient(s), float64); global batch %d x %d x %d = %d.",
                world,
                backend,
                args.device.type,
                8 * n,
                n,
                args.per_device_train_batch_size,
                world,
                args.gradient_accumulation_steps,
                global_batch,
            )
        else:
            logger.info(
                "ZO in one process on %s (not data parallel: 0 bytes all-reduced per step); global batch %d.",
                args.device.type,
                global_batch,
            )
        requested = _requested_processes()
        if requested is not None and requested[0] > world and trainer.is_world_process_zero():
            logger.warning(
                "%s asked for %d processes but this run has %d: it is NOT data parallel. accelerate launch starts "
                "one process with --cpu; use `accelerate launch --multi_gpu --num_processes N` (without --cpu; "
                "on a machine without GPUs it runs gloo on CPU) or `torchrun --nproc_per_node N`.",
                requested[1],
                requested[0],
                world,
            )


def is_complete_checkpoint(folder: str) -> bool:
    """HF writes a checkpoint in place and ``trainer_state.json`` last: without it readable, the save was cut short."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def checkpoint_folders(output_dir: str) -> list[str]:
    """Every ``checkpoint-N`` folder in ``output_dir`` (complete or not), by increasing step."""
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, number = name.partition(f"{PREFIX_CHECKPOINT_DIR}-")
        if not prefix and number.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(number))
    return [os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}") for step in sorted(steps)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step ``checkpoint-N`` in ``output_dir`` whose save finished (see ``is_complete_checkpoint``)."""
    for folder in reversed(checkpoint_folders(output_dir)):
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("%s is incomplete (interrupted save): skipped.", folder)
    return None


_TEARDOWN_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits normally (after an exception too).

    Nothing else does (Accelerate leaves it to the process's end): torch then tears gloo down during interpreter
    finalization, where a still-joinable worker thread makes the process abort with "terminate called without an
    active exception" (SIGABRT) now and then, after a run that succeeded.
    """
    global _TEARDOWN_REGISTERED
    if _TEARDOWN_REGISTERED:
        return
    _TEARDOWN_REGISTERED = True

    def teardown() -> None:
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    atexit.register(teardown)


@contextlib.contextmanager
def _allow_quantized_training() -> Iterator[None]:
    """Trainer refuses quantized models without PEFT adapters; QZO trains their scales, so lift that check here only."""
    original = hf_trainer_module.validate_quantization_for_training
    hf_trainer_module.validate_quantization_for_training = lambda model: None
    try:
        yield
    finally:
        hf_trainer_module.validate_quantization_for_training = original


class ZOTrainer(Trainer):
    """A ``Trainer`` that also runs ``optim`` = ``mezo`` | ``sparse_mezo`` | ``qzo`` (see ``ZOTrainingArguments``).

    Batches from ``zo_trainer.data.CandidateCollator`` (classification as language modelling) are
    scored by candidate log-likelihood; other batches use the model's own loss.
    """

    # Left at HF's default (None): the ZO step divides its loss by the accumulation steps itself and never reaches the
    # code that reads this, and first-order runs through ZOTrainer must scale their loss exactly as plain Trainer does.

    def __init__(self, model: nn.Module | None = None, args: ZOTrainingArguments | None = None, *pargs, **kwargs):
        is_zo = isinstance(args, ZOTrainingArguments) and args.is_zo
        self.zo_method: ZOMethod | None = None
        self.zo_engine: ZOEngine | None = None
        if is_zo and args.optim == "qzo":
            with _allow_quantized_training():
                super().__init__(model, args, *pargs, **kwargs)
        else:
            super().__init__(model, args, *pargs, **kwargs)
        if is_zo:
            _configure_zo_logging(self.args)
            self._setup_zo()

    @property
    def is_zo(self) -> bool:
        return self.zo_engine is not None

    def _setup_zo(self) -> None:
        method = get_method(self.args.optim)(self.args)
        targets = method.targets(self.model)
        if not targets:
            raise ValueError(f"optim={self.args.optim!r} found no tensors to train in {type(self.model).__name__}.")
        bad = first_non_finite((t.name, t.get()) for t in targets)
        if bad is not None:  # Every step would be skipped: refuse now, naming the tensor.
            raise ValueError(f"the model's tensor {bad!r} holds NaN/inf values: load intact weights before training.")
        # Nothing may ask autograd for gradients: no graph is built and no .grad is ever allocated.
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.zo_method = method
        self.zo_engine = ZOEngine(targets, distribution=self.args.zo_noise)
        self.add_callback(ZOCallback(self.zo_engine, method))
        self.add_callback(ZOTrajectoryCallback(self))
        self.add_callback(ZOLayoutCallback(self))
        trained = sum(t.numel for t in targets)
        logger.info("%s: %d tensors, %.1fM entries take part.", method.name, len(targets), trained / 1e6)

    # ----- optimizer -------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if not self.is_zo:
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = ZOOptimizer(
                self.zo_engine,
                self.zo_method,
                lr=self.args.learning_rate,
                num_perturbations=self.args.zo_num_perturbations,
                max_skipped_steps=self.args.zo_max_skipped_steps,
                data_parallel=self._zo_data_parallel(),
            )
        return self.optimizer

    def _zo_data_parallel(self) -> bool:
        """Whether the projected gradients are all-reduced: exactly when Trainer shards the data across processes."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1 and self.args.world_size != world:
            raise RuntimeError(
                f"torch.distributed runs {world} processes but the Trainer runs {self.args.world_size} (it would not "
                "shard the data). On a machine without GPUs pass --use_cpu true so Accelerate sets up gloo data parallel."
            )
        if world > 1:
            _destroy_process_group_at_exit()
        return self.args.world_size > 1

    def _clip_grad_norm(self, model):
        return None if self.is_zo else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        return None if self.is_zo else super()._get_grad_norm(model, grad_norm)

    def _zo_optimizer(self) -> ZOOptimizer:
        optimizer = self.optimizer
        return getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it.

    # ----- data parallel -----------------------------------------------------------------------
    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        """ZO training never wraps the model in DDP (or DataParallel).

        DDP would allocate gradient buckets and, on CPU/gloo, refuses a model with nothing requiring grad.
        ZO needs neither: every rank computes L(w +- eps z) on its shard and ``ZOOptimizer.step`` all-reduces
        the n projected gradients. ``prepare_model(evaluation_mode=True)`` places the model and applies mixed
        precision / torch.compile as Accelerate would, and marks it prepared, so Trainer's later
        ``accelerator.prepare(model, optimizer)`` leaves it unwrapped.
        """
        if not (self.is_zo and training):
            return super()._wrap_model(model, training=training, dataloader=dataloader)
        if self.args.n_gpu > 1:
            logger.warning(
                "ZO runs on one device per process: %d GPUs are visible to one process. Launch one process per "
                "GPU (torchrun --nproc_per_node N / accelerate launch --multi_gpu) for data-parallel ZO.",
                self.args.n_gpu,
            )
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        """HF keeps only the dataset columns named here (``remove_unused_columns``): add those our collator reads."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = getattr(self.data_collator, "input_columns", ())
            if isinstance(self.data_collator, CandidateCollator):
                self._signature_columns += [c for c in extra if c not in self._signature_columns]

    def _get_num_items_in_batch(self, batch_samples, device):
        # ZO losses are per-micro-batch means: HF's token count (gathered from every rank at every step) is not used.
        return None if self.is_zo else super()._get_num_items_in_batch(batch_samples, device)

    # ----- the step --------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "candidate_ids" in inputs:
            loss, scores = candidate_loss(model, inputs)
            return (loss, {"loss": loss, "logits": scores}) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self.is_zo:
            return super().training_step(model, inputs, num_items_in_batch)
        # Both passes must see the same function: no dropout (Llama-family models have none anyway).
        model.eval()
        inputs = self._prepare_inputs(inputs)
        loss = zo_step(
            self.zo_engine,
            self._zo_optimizer(),
            lambda: self.compute_loss(model, inputs),
            eps=self.args.zo_eps,
            num_perturbations=self.args.zo_num_perturbations,
            seed=self.args.seed,
            step=self.state.global_step,
            device=self.args.device,
        )
        return loss / self.current_gradient_accumulation_steps

    # ----- saving --------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "last"):
            resume_from_checkpoint = True  # What a command line passes (HF's flag is a string).
        if resume_from_checkpoint is True:
            # HF would take the highest-numbered folder even if a kill cut its save short.
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        elif isinstance(resume_from_checkpoint, str) and not is_complete_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (its save was interrupted: no readable "
                f"{TRAINER_STATE_NAME}); resume from an earlier one, e.g. {last_complete_checkpoint(os.path.dirname(resume_from_checkpoint.rstrip('/')))}."
            )
        if self.is_zo and isinstance(resume_from_checkpoint, str):
            self._check_zo_resume(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except NonFiniteLossError as error:
            if "Last checkpoint:" in str(error):
                raise
            last = last_complete_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"{error} Last checkpoint: {last or 'none was saved'} (resume with resume_from_checkpoint)."
            ) from error

    def _check_zo_resume(self, checkpoint: str) -> None:
        """Refuse a resume that would not continue the checkpoint's run exactly, naming what differs.

        Runs before HF loads the checkpoint's weights, so the model still holds the weights this run starts from.
        """
        if not os.path.isfile(os.path.join(checkpoint, TRAJECTORY_NAME)):
            if os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
                return  # Written before zo_trajectory.json held the ZO state: optimizer.pt has it.
            raise ValueError(
                f"cannot resume from {checkpoint}: it has neither {TRAJECTORY_NAME} nor {OPTIMIZER_NAME}, so the ZO "
                "state (trajectory, Sparse-MeZO thresholds, base fingerprint) is lost: it was not written by a ZO run, "
                "or files were deleted. Start a new run."
            )
        try:
            saved = load_trajectory(checkpoint)
        except TrajectoryError as error:
            raise ValueError(f"cannot resume from {checkpoint}: {error}") from None
        args, method, first = self.args, self.zo_method, self.zo_engine.targets[0].get()
        differences = []

        def compare(name: str, theirs: Any, ours: Any) -> None:
            if theirs != ours:
                differences.append(f"{name} {theirs!r} in the checkpoint, {ours!r} now")

        compare("optim", saved.get("method"), method.name)
        compare("seed", saved.get("seed"), args.seed)
        compare("zo_eps", saved.get("eps"), args.zo_eps)
        compare("zo_num_perturbations", saved.get("num_perturbations"), args.zo_num_perturbations)
        compare("zo_sparsity", saved.get("sparsity"), method.sparsity)
        compare("zo_noise", (saved.get("noise") or {}).get("distribution", "gaussian"), args.zo_noise)
        for name, value in (saved.get("method_args") or {}).items():
            compare(name, value, _json_float(getattr(args, name, None)))
        compare("dtype", saved.get("dtype"), str(first.dtype).removeprefix("torch."))
        if saved.get("targets") is not None and saved["targets"] != [t.name for t in self.zo_engine.targets]:
            differences.append("the trained tensors differ (another architecture, or other tensors frozen)")
        elif saved.get("base_fingerprint") is not None:
            # HF replaces the weights by the checkpoint's, so only another base model (other weights under another
            # name: its tokenizer and config would also differ) is refused, not a model built with another init.
            def where(name: Any) -> Any:
                return os.path.abspath(name) if isinstance(name, str) and os.path.isdir(name) else (name or None)

            now = weights_fingerprint(self.zo_engine)
            same_weights = any(
                fingerprints_match(now, saved[key]) for key in ("base_fingerprint", "fingerprint") if saved.get(key)
            )
            if not same_weights and where(saved.get("base_model")) != where(getattr(self.model, "name_or_path", None)):
                differences.append(
                    f"base model: this run's model ({getattr(self.model, 'name_or_path', None)!r}) is not the one the "
                    f"checkpoint's run started from ({saved.get('base_model')!r}; weight fingerprints differ)"
                )
        if differences:
            raise ValueError(
                f"cannot resume from {checkpoint}: it was trained with different settings: "
                + "; ".join(differences)
                + ". Resume with the checkpoint's settings, or start a new run in another --output_dir."
            )
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
            step = json.load(handle).get("global_step", 0)
        recorded = [record.get("global_step", index + 1) for index, record in enumerate(saved["steps"])]
        if recorded != list(range(1, step + 1)):
            span = f"steps {recorded[0]}..{recorded[-1]}" if recorded else "no steps"
            raise ValueError(
                f"cannot resume from {checkpoint}: its trajectory records {span}, not 1..{step} (the run was resumed "
                "before without its ZO state), so the result could not be replayed. Start a new run."
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """HF's restore, or, where ``optimizer.pt``/``scheduler.pt`` are missing (``--save_only_model``, a lost file),
        the same ZO state from the checkpoint's ``zo_trajectory.json``, which ``save_model`` always writes."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if not self.is_zo or checkpoint is None:
            return
        if all(os.path.isfile(os.path.join(checkpoint, name)) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)):
            return  # HF restored both; the ZO optimizer's state_dict holds the trajectory.
        try:
            saved = load_trajectory(checkpoint)
        except TrajectoryError as error:
            raise ValueError(f"cannot resume from {checkpoint}: no {OPTIMIZER_NAME} and {error}") from None
        resume = saved.get("resume") or {}
        if resume.get("lr_scheduler") is None or resume.get("param_groups") is None:
            raise ValueError(
                f"cannot resume from {checkpoint} exactly: it has no {OPTIMIZER_NAME}/{SCHEDULER_NAME} and its "
                f"{TRAJECTORY_NAME} does not hold the learning-rate schedule's state (an older zo_trainer, or a "
                "scheduler whose state is not JSON), so the schedule would restart. Resume from a checkpoint saved "
                "with its optimizer state, or start a new run."
            )
        optimizer = self._zo_optimizer()
        optimizer.load_state_dict(
            {
                "param_groups": resume["param_groups"],
                "thresholds": saved.get("thresholds") or {},
                "trajectory": saved["steps"],
                "consecutive_skips": resume.get("consecutive_skips", 0),
                "consecutive_zero_gradients": resume.get("consecutive_zero_gradients", 0),
                "base_fingerprint": saved.get("base_fingerprint"),
                "noise": saved.get("noise"),
            }
        )
        self.lr_scheduler.load_state_dict(resume["lr_scheduler"])
        logger.info("Restored the ZO state and LR schedule of %s from its %s.", checkpoint, TRAJECTORY_NAME)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """HF's ``save_model`` plus ``zo_trajectory.json`` (written atomically), in checkpoints and at the end."""
        if self.is_zo:
            bad = first_non_finite((t.name, t.get()) for t in self.zo_engine.targets)
            if bad is not None:  # Never overwrite an intact model, nor make a checkpoint, with diverged weights.
                last = last_complete_checkpoint(self.args.output_dir)
                raise NonFiniteLossError(
                    f"the weights became non-finite (tensor {bad!r} holds NaN/inf) by global step "
                    f"{self.state.global_step}, so they were not saved (learning rate too large?). Last checkpoint: "
                    f"{last or 'none was saved'} (its weights are intact)."
                )
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.is_zo:
            save_trajectory(self, output_dir if output_dir is not None else self.args.output_dir)
            final = not _internal_call and os.path.abspath(output_dir or self.args.output_dir) == os.path.abspath(
                self.args.output_dir
            )
            if final:  # The final save (not a checkpoint): the model card says how these weights were trained.
                try:
                    self.create_model_card()
                except Exception as error:  # noqa: BLE001 - a draft card must never cost the trained weights.
                    logger.warning("Could not write the model card (README.md): %s", error)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from .quant import get_backend, save_quantized

        if get_backend(self.model) is None:
            return super()._save(output_dir, state_dict)
        # transformers' save_pretrained of a GPTQ model re-packs zero-points from the kernel's view and
        # rounds fp32 scales to fp16; save_quantized writes the int4 tensors untouched and the fp32 scales.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_quantized(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    # ----- logging -----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.is_zo and "loss" in logs:  # Training logs only, not evaluation.
            optimizer = self._zo_optimizer()
            if isinstance(optimizer, ZOOptimizer):
                projected = optimizer.pop_logged_projected_gradient()
                if projected is not None:
                    logs["zo_projected_grad"] = projected
                if optimizer.consecutive_skips:
                    logs["zo_skipped_steps"] = optimizer.consecutive_skips
                skipped, steps = optimizer.pop_window_skips()
                if steps and skipped == steps:  # HF's NaN filter would log 0 (a perfect loss) for skipped steps.
                    logs["loss"] = float("nan")
            fraction = self.zo_engine.pop_mask_fraction()
            if fraction is not None:
                logs["zo_update_fraction"] = fraction
        if self.is_zo and "train_loss" in logs:
            trajectory = getattr(self._zo_optimizer(), "trajectory", None)
            if trajectory and all(record.get("skipped") for record in trajectory):
                logs["train_loss"] = float("nan")  # Every step skipped: there is no training loss, not a loss of 0.
        super().log(logs, start_time)

    # ----- model card --------------------------------------------------------------------------
    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """HF's model card (``output_dir/README.md``), plus how a ZO run trained: method, settings, trajectory file."""
        if not self.is_zo:
            return super().create_model_card(*args, tags=tags, **kwargs)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in ("zo_trainer", "zeroth-order", str(self.args.optim)) if t not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as handle:
            card = handle.read()
        section = self._zo_model_card_section()
        marker = "\n### Framework versions\n"
        card = card.replace(marker, f"\n{section}{marker}", 1) if marker in card else f"{card}\n{section}"
        from . import __version__

        card = card.rstrip("\n") + f"\n- zo_trainer {__version__}\n"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(card)

    def _zo_model_card_section(self) -> str:
        args, method = self.args, self.zo_method
        papers = {
            "mezo": "MeZO, Malladi et al. 2023",
            "sparse_mezo": "Sparse-MeZO, Liu et al. 2024",
            "qzo": "QZO, Shang et al. 2025",
        }
        clip = method.clip_value
        trained = sum(t.numel for t in self.zo_engine.targets)
        lines = [
            "### Zeroth-order training",
            "",
            (
                f"Trained with zo_trainer using `{args.optim}` ({papers.get(str(args.optim), str(args.optim))}): no "
                "backward pass; each step estimates the gradient along one random direction z from two forward "
                "passes at w + eps*z and w - eps*z."
            ),
            "",
            f"- zo_method: {args.optim}",
            f"- zo_eps: {args.zo_eps}",
            f"- zo_sparsity: {method.sparsity} (fraction of each matrix kept frozen)",
            f"- zo_clip: {'none' if clip is None or clip == float('inf') else clip}",
            f"- zo_num_perturbations: {args.zo_num_perturbations}",
            f"- zo_noise: {self.zo_engine.distribution} (entries of z)",
            f"- learning_rate: {args.learning_rate}",
            f"- steps: {self.state.global_step}",
            f"- seed: {args.seed}",
            f"- trained tensors: {len(self.zo_engine.targets)} ({trained / 1e6:.2f}M entries)",
            (
                f"- trajectory: `{TRAJECTORY_NAME}` (seeds, projected gradients and learning rate of every step; "
                f"`zo-replay --trajectory {TRAJECTORY_NAME}` rebuilds these weights from the base model)"
            ),
            "",
        ]
        return "\n".join(lines) + "\n"

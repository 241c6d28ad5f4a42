"""``ZOTrainer``: HF ``Trainer`` with zeroth-order optimizers wired in.

Only the step changes: ``training_step`` runs two forward passes per direction under ``no_grad`` and
records the projected gradient; ``ZOOptimizer.step()`` (called by HF's loop) applies the update.
HF keeps doing argument parsing, LR schedules, logging, evaluation, checkpointing and progress bars.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers import trainer as hf_trainer_module
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.trainer import TRAINER_STATE_NAME

from .data import candidate_loss
from .engine import ZOEngine, perturbation_seed, projected_gradient
from .methods import ZOMethod, get_method
from .optim import NonFiniteLossError, ZOOptimizer, fingerprints_match, weights_fingerprint
from .replay import save_trajectory
from .training_args import ZOTrainingArguments

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

    def __init__(self, trainer: "ZOTrainer"):
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


def is_complete_checkpoint(folder: str) -> bool:
    """HF writes a checkpoint in place and ``trainer_state.json`` last: without it readable, the save was cut short."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step ``checkpoint-N`` in ``output_dir`` whose save finished (see ``is_complete_checkpoint``)."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, number = name.partition(f"{PREFIX_CHECKPOINT_DIR}-")
        if not prefix and number.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(number))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("%s is incomplete (interrupted save): skipped.", folder)
    return None


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

    # Our losses are means over the batch; HF divides them by the accumulation steps for logging.
    loss_is_scaled_for_ga = False

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
            self._setup_zo()

    @property
    def is_zo(self) -> bool:
        return self.zo_engine is not None

    def _setup_zo(self) -> None:
        method = get_method(self.args.optim)(self.args)
        targets = method.targets(self.model)
        if not targets:
            raise ValueError(f"optim={self.args.optim!r} found no tensors to train in {type(self.model).__name__}.")
        # Nothing may ask autograd for gradients: no graph is built and no .grad is ever allocated.
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.zo_method = method
        self.zo_engine = ZOEngine(targets)
        self.add_callback(ZOCallback(self.zo_engine, method))
        self.add_callback(ZOTrajectoryCallback(self))
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
        optimizer = self._zo_optimizer()
        eps = self.args.zo_eps
        total = torch.zeros((), device=self.args.device)
        with torch.no_grad():
            for index in range(self.args.zo_num_perturbations):
                seed = perturbation_seed(self.args.seed, self.state.global_step, index)
                with self.zo_engine.perturbed(seed, +eps):
                    loss_plus = self.compute_loss(model, inputs)
                with self.zo_engine.perturbed(seed, -eps):
                    loss_minus = self.compute_loss(model, inputs)
                optimizer.accumulate(
                    index, seed, projected_gradient(loss_plus, loss_minus, eps), step=self.state.global_step
                )
                total += (loss_plus.detach() + loss_minus.detach()).float().to(total.device)
        loss = total / (2 * self.args.zo_num_perturbations)
        return loss / self.current_gradient_accumulation_steps

    # ----- saving --------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
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
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except NonFiniteLossError as error:
            last = last_complete_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"{error} Last checkpoint: {last or 'none was saved'} (resume with resume_from_checkpoint)."
            ) from error

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """HF's ``save_model`` plus ``zo_trajectory.json`` (written atomically), in checkpoints and at the end."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.is_zo:
            save_trajectory(self, output_dir if output_dir is not None else self.args.output_dir)

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
            fraction = self.zo_engine.pop_mask_fraction()
            if fraction is not None:
                logs["zo_update_fraction"] = fraction
        super().log(logs, start_time)

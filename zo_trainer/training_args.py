"""``ZOTrainingArguments``: HF ``TrainingArguments`` plus the zeroth-order optimizers and their settings."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from .engine import ZOEngine
from .methods import ZO_METHODS

logger = logging.getLogger(__name__)

# The registered ZO method names, live: a method added by ``register_method`` later is in it too.
ZO_OPTIMIZERS = ZO_METHODS.keys()


def _launched_on_cpu_only() -> bool:
    """Started by a multi-process launcher (torchrun, accelerate launch) on a machine with no accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("LOCAL_RANK", "-1")) < 0:
        return False
    import torch

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return not has_accelerator


class _OptimChoices:
    """``--optim`` choices computed when argparse reads them: the registered ZO methods, then HF's optimizers."""

    def _names(self) -> list[str]:
        return list(ZO_OPTIMIZERS) + [o.value for o in OptimizerNames]

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __len__(self) -> int:
        return len(self._names())


_OPTIM_CHOICES = _OptimChoices()
ZO_NOISE_DISTRIBUTIONS = ZOEngine.NOISE_DISTRIBUTIONS  # --zo_noise choices: how the engine can draw z's entries.


@dataclass
class ZOTrainingArguments(TrainingArguments):
    r"""
    ``TrainingArguments`` whose ``optim`` also accepts the zeroth-order methods (``mezo``, ``sparse_mezo``, ``qzo``
    and any added with ``zo_trainer.methods.register_method``).

    With a ZO optimizer no backward runs, no ``.grad`` and no optimizer state is allocated: each step evaluates the
    loss at ``w + eps z`` and ``w - eps z`` and moves ``w`` along ``z``. Only the parameters below are added; every
    other parameter is ``transformers.TrainingArguments``'. The same text is the ``--help`` of ``zo-train``.

    Parameters:
        optim (`str`, *optional*, defaults to `"adamw_torch"`):
            `"mezo"` (dense ZO-SGD), `"sparse_mezo"` (ZO on the small-magnitude entries of each weight matrix),
            `"qzo"` (ZO on the quantization scales of an int4 model), a registered method, or any of HF's
            first-order optimizers.
        zo_eps (`float`, *optional*, defaults to `1e-3`):
            Perturbation scale eps of the two-point estimate; must be > 0.
        zo_sparsity (`float` or `None`, *optional*, defaults to `None`):
            Fraction of each weight matrix (of each scale tensor for qzo) that stays frozen; the smallest-magnitude
            (1 - sparsity) are trained. In [0, 1). `None`: 0.8 for sparse_mezo, 0 for qzo (mezo refuses > 0).
        zo_num_perturbations (`int`, *optional*, defaults to `1`):
            Directions z per step; their estimates are averaged (n-SPSA). Each costs two forward passes.
        zo_clip (`float` or `None`, *optional*, defaults to `None`):
            Clip the projected gradient to [-zo_clip, zo_clip]. `None`: 100 for qzo (the paper's value), no
            clipping otherwise; `inf` disables it.
        zo_train_unquantized (`bool`, *optional*, defaults to `False`):
            qzo only: also train the un-quantized tensors (norms, embeddings, lm_head) with dense ZO.
        zo_max_skipped_steps (`int`, *optional*, defaults to `10`):
            Stop with an error after this many consecutive steps skipped for a non-finite loss.
        zo_noise (`str`, *optional*, defaults to `"gaussian"`):
            Distribution of the entries of the direction z: `"gaussian"` (N(0, 1), as in the MeZO / Sparse-MeZO /
            QZO papers; 256 bf16-exact quantiles of it from a counter-based stream, z scheme 5) or `"rademacher"` (+-1
            with probability 1/2 each, SPSA's classic choice: the estimate is unbiased likewise; the same stream's
            signs, z scheme 6). Both cost the same to draw. Recorded in the trajectory and checkpoints, so replay and resume draw the same z.

    Which of these a method reads is its ``MethodConfig`` (``zo_trainer.methods``), built from these arguments by
    ``MethodConfig.from_training_args``.
    """

    optim: str = field(
        default="adamw_torch",
        metadata={
            "help": "Optimizer: 'mezo' (dense ZO-SGD), 'sparse_mezo' (ZO on small-magnitude weights), 'qzo' "
            "(ZO on the quantization scales of an int4 model), or any of HF's first-order optimizers.",
            "choices": _OPTIM_CHOICES,
        },
    )
    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale eps of the two-point estimate."})
    zo_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each weight matrix (of each scale tensor for qzo) that stays frozen; the "
            "smallest-magnitude (1 - sparsity) are trained. Default: 0.8 for sparse_mezo, 0 for qzo."
        },
    )
    zo_num_perturbations: int = field(
        default=1, metadata={"help": "Directions z per step; their estimates are averaged (n-SPSA)."}
    )
    zo_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip the projected gradient to [-zo_clip, zo_clip]. Default: 100 for qzo (the paper's "
            "value), no clipping otherwise; 'inf' disables it."
        },
    )
    zo_train_unquantized: bool = field(
        default=False,
        metadata={"help": "qzo: also train the un-quantized tensors (norms, embeddings, lm_head) with dense ZO."},
    )
    zo_max_skipped_steps: int = field(
        default=10,
        metadata={"help": "Stop with an error after this many consecutive steps skipped for a non-finite loss."},
    )
    zo_noise: str = field(
        default="gaussian",
        metadata={
            "help": "Entries of the direction z: 'gaussian' (N(0, 1), the papers') or 'rademacher' (+-1 with "
            "probability 1/2, SPSA's; unbiased likewise).",
            "choices": ZO_NOISE_DISTRIBUTIONS,
        },
    )

    @property
    def is_zo(self) -> bool:
        return str(self.optim) in ZO_OPTIMIZERS

    def __post_init__(self) -> None:
        zo_name = str(self.optim) if str(self.optim) in ZO_OPTIMIZERS else None
        if zo_name is not None:
            default = {f.name: f.default for f in dataclasses.fields(self)}.get("gradient_checkpointing")
            if self.gradient_checkpointing and default is True:
                # A subclass turns it on by default (TRL's SFTConfig); a ZO step has no backward to checkpoint.
                logger.info(
                    "%s: gradient_checkpointing off (its default is on; ZO runs no backward).", type(self).__name__
                )
                self.gradient_checkpointing = None  # Unset: HF resolves it to False, without its deprecation warning.
            self._validate_zo(zo_name)
            _register_plain_trainer_refusals()  # For a method registered after this module was imported.
            if int(os.environ.get("RANK", "0")) != 0:
                # Warnings once per run, not once per process: the other ranks log errors only (data preparation
                # before the Trainer exists included; ZOTrainer confirms it from the Trainer's own process index).
                logging.getLogger("zo_trainer").setLevel(logging.ERROR)
            if _launched_on_cpu_only() and not self.use_cpu:
                # torchrun / accelerate launch on a machine without an accelerator: Accelerate only sets up
                # MULTI_CPU (gloo, sharded data) with use_cpu; otherwise every process would train on all the data.
                # (The layout is logged at train start, once logging is set up: see trainer.ZOLayoutCallback.)
                self.use_cpu = True
            # The parent converts ``optim`` to HF's enum, which has no ZO names: hold ours aside meanwhile.
            self.optim = OptimizerNames.SGD.value
        try:
            super().__post_init__()
        finally:
            if zo_name is not None:
                self.optim = zo_name

    def _validate_zo(self, name: str) -> None:
        problems = []
        if not (self.zo_eps > 0 and math.isfinite(self.zo_eps)):
            problems.append(f"zo_eps must be a positive number, got {self.zo_eps}.")
        if self.zo_sparsity is not None and not 0.0 <= self.zo_sparsity < 1.0:
            problems.append(f"zo_sparsity is the frozen fraction and must be in [0, 1), got {self.zo_sparsity}.")
        if name == "mezo" and self.zo_sparsity:
            problems.append("zo_sparsity > 0 with optim='mezo': use optim='sparse_mezo' for sparse ZO.")
        if self.zo_num_perturbations < 1:
            problems.append(f"zo_num_perturbations must be >= 1, got {self.zo_num_perturbations}.")
        if self.zo_clip is not None and not self.zo_clip > 0:
            problems.append(
                f"zo_clip={self.zo_clip} clips every step to zero and freezes training; use a positive bound "
                "(the paper's is 100) or 'inf' for no clipping."
            )
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.zo_max_skipped_steps < 1:
            problems.append(f"zo_max_skipped_steps must be >= 1, got {self.zo_max_skipped_steps}.")
        if self.zo_noise not in ZO_NOISE_DISTRIBUTIONS:
            problems.append(f"zo_noise must be one of {', '.join(ZO_NOISE_DISTRIBUTIONS)}, got {self.zo_noise!r}.")
        if self.fp16:
            problems.append(
                "fp16 mixed precision needs a backward pass for its loss scaler; ZO has none. Use --bf16, or load the "
                "model in float16 (dtype=float16): the ZO perturbation is exact in half precision."
            )
        if self.deepspeed or self.fsdp:
            problems.append(
                "DeepSpeed and FSDP shard gradients and optimizer state that ZO does not have; run ZO as plain data "
                "parallel (torchrun / accelerate launch --multi_gpu), which only all-reduces one float per step."
            )
        if self.gradient_checkpointing or self.activation_checkpointing:
            problems.append("gradient_checkpointing saves backward memory; ZO runs no backward, so turn it off.")
        if problems:
            raise ValueError(f"Invalid arguments for optim={name!r}:\n  - " + "\n  - ".join(problems))


def _plain_trainer_refusal(optim: str):
    def refuse(ctx) -> None:
        raise ValueError(
            f"optim={optim!r} is a zeroth-order optimizer, which transformers' plain Trainer cannot run: build the "
            "trainer with zo_trainer.ZOTrainer instead of Trainer, or call zo_trainer.enable() before creating it "
            "(or launch an unmodified script with `zo-run script.py ...`)."
        )

    return refuse


def _register_plain_trainer_refusals() -> None:
    """Make HF's own Trainer refuse a ZO ``optim`` with a message naming the fix, not "unsupported optimizer".

    ``Trainer.create_optimizer`` looks ``args.optim`` up in this table; ``ZOTrainer`` never reaches it for ZO names.
    """
    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    except ImportError:  # A transformers without the table: HF's own "unsupported optimizer" error stands.
        return
    for name in ZO_OPTIMIZERS:
        _OPTIMIZER_HANDLERS.setdefault(name, _plain_trainer_refusal(name))


_register_plain_trainer_refusals()

"""What the suites time: one ZO training step (``zo_trainer.step.zo_step`` + ``ZOOptimizer.step``, the calls
``ZOTrainer`` makes), MeZO's four-pass reference step as a baseline, and two plain forwards (the floor)."""

from __future__ import annotations

import random
import tempfile

import torch

from zo_trainer.data import candidate_loss
from zo_trainer.engine import ZOEngine
from zo_trainer.methods import get_method
from zo_trainer.optim import ZOOptimizer
from zo_trainer.step import zo_step
from zo_trainer.training_args import ZOTrainingArguments

from .common import EngineClock


def zo_args(optim: str, **overrides) -> ZOTrainingArguments:
    kwargs = dict(
        output_dir=tempfile.gettempdir(), optim=optim, learning_rate=1e-6, zo_eps=1e-3, report_to="none", use_cpu=True
    )
    kwargs.update(overrides)
    return ZOTrainingArguments(**kwargs)


class ZOStepper:
    """One training step as ZOTrainer runs it (``zo_trainer.step.zo_step``, then ``ZOOptimizer.step``), on one batch
    without the Trainer loop around it."""

    num_perturbations = 1

    def __init__(
        self, model, optim: str, noise_scheme: int | None = None, openmp_team: bool | None = None, **args_overrides
    ):
        """``noise_scheme``: draw z as that z scheme does (default: the engine's, as new runs do); ``openmp_team``:
        False runs scheme 5's C passes on the engine's noise threads, not torch's OpenMP team (the before of it)."""
        self.args = zo_args(optim, **args_overrides)
        self.model = model
        self.method = get_method(optim)(self.args)
        for p in model.parameters():  # as loaded by from_pretrained (another stepper may have frozen them)
            p.requires_grad_(p.is_floating_point())
        targets = self.method.targets(model)
        for p in model.parameters():  # as ZOTrainer does: nothing asks autograd for gradients
            p.requires_grad_(False)
        self.engine = ZOEngine(targets, distribution=self.args.zo_noise)
        self.engine.noise_scheme = noise_scheme or self.engine.noise_scheme
        if openmp_team is not None:
            self.engine.on_openmp_team = openmp_team and self.engine.on_openmp_team
        if self.method.sparsity > 0:
            self.engine.set_thresholds(self.method.sparsity, select=self.method.is_sparsified)
        self.optimizer = ZOOptimizer(
            self.engine,
            self.method,
            lr=self.args.learning_rate,
            num_perturbations=self.num_perturbations,
            max_skipped_steps=10,
        )
        self.step_index = 0
        # Seconds inside the engine per step: the step's own work, which the host's drift between timings does not
        # blur as it does a step / two-forwards ratio.
        self.engine_seconds: list[float] = []
        self.module_seconds: list[float] = []  # Forward work the hooks did in a module's place (not engine work).
        self._engine_clock = EngineClock(self.engine)
        self.engine.remove()  # hooks only while this stepper runs (so other measurements see a plain model)

    def step(self, batch) -> float:
        """One step on ``batch``; returns the mean of its forward passes' losses."""
        self.engine.install()
        self._engine_clock.lap()
        try:
            loss = zo_step(
                self.engine,
                self.optimizer,
                lambda: candidate_loss(self.model, batch)[0],
                eps=self.args.zo_eps,
                num_perturbations=self.num_perturbations,
                seed=self.args.seed,
                step=self.step_index,
            )
            self.optimizer.step()
            self.step_index += 1
            return float(loss)
        finally:
            self.engine.remove()
            self.engine_seconds.append(self._engine_clock.lap())
            self.module_seconds.append(self._engine_clock.last_module_seconds)


class MeZOReferenceBaseline:
    """Baseline, not our step: MeZO's reference implementation (Malladi et al. 2023, ``trainer.py``: ``zo_step`` +
    ``zo_update``), timed beside ``ZOStepper`` and run beside it by the study's ``reference`` runs.

    Four passes over the weights per step, each regenerating z with ``torch.manual_seed(seed)`` and one
    ``torch.normal`` per parameter: w += eps z; forward; w -= 2 eps z; forward; w += eps z; w -= lr (g z + wd w).
    As in MeZO's code, ``param.data = param.data + ...`` allocates a new tensor per parameter and pass.
    """

    def __init__(self, model, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0):
        self.model, self.lr, self.eps, self.weight_decay = model, lr, eps, weight_decay
        self.params = list(model.named_parameters())  # every parameter, as MeZO's code perturbs them
        for _, p in self.params:
            p.requires_grad_(False)
        self.rng = random.Random(0)

    def _perturb(self, seed: int, scaling: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling * z * self.eps

    @torch.no_grad()
    def step(self, batch) -> float:
        seed = self.rng.randint(0, 1_000_000_000)
        self._perturb(seed, 1)
        loss1, _ = candidate_loss(self.model, batch)
        self._perturb(seed, -2)
        loss2, _ = candidate_loss(self.model, batch)
        self._perturb(seed, 1)
        projected_grad = float((loss1 - loss2) / (2 * self.eps))
        torch.manual_seed(seed)
        for name, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "norm" not in name:
                param.data = param.data - self.lr * (projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)
        return float(loss1 + loss2) / 2


@torch.no_grad()
def plain_forwards(model, batch, n: int = 2) -> float:
    """The floor of a ZO step: ``n`` no-grad forwards of the same model on the same batch, no hooks."""
    total = 0.0
    for _ in range(n):
        loss, _ = candidate_loss(model, batch)
        total += float(loss)
    return total

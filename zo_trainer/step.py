"""One ZO training step's forward passes: the function ``ZOTrainer.training_step`` runs, and the one to drive
from anywhere else (benchmarks included) instead of a copy.

For each of the ``n`` directions ``z_k`` (seeded by ``perturbation_seed(seed, step, k)``): the loss at ``w + eps z_k``
and at ``w - eps z_k`` (perturbed inside the forward pass, weights never change), and the projected gradient
``(L+ - L-) / 2eps`` handed to ``ZOOptimizer.accumulate``. The update itself is ``ZOOptimizer.step()`` (HF calls
it after gradient accumulation, with the scheduler's learning rate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .engine import ZOEngine, perturbation_seed, projected_gradient

if TYPE_CHECKING:
    from .optim import ZOOptimizer


def zo_step(
    engine: ZOEngine,
    optimizer: ZOOptimizer,
    loss_fn: Callable[[], torch.Tensor],
    *,
    eps: float,
    num_perturbations: int,
    seed: int,
    step: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run the ``2 * num_perturbations`` forward passes of step ``step``; returns their mean loss.

    ``loss_fn()`` computes the loss of the current batch with the model as it is (the engine perturbs it);
    ``seed`` is the run's seed and ``step`` the global step (HF's ``state.global_step``), which fix the directions.
    Put the model in eval mode first: both passes must see the same function (no dropout).
    """
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for index in range(num_perturbations):
            direction_seed = perturbation_seed(seed, step, index)
            with engine.perturbed(direction_seed, +eps):
                loss_plus = loss_fn()
            with engine.perturbed(direction_seed, -eps):
                loss_minus = loss_fn()
            optimizer.accumulate(index, direction_seed, projected_gradient(loss_plus, loss_minus, eps), step=step)
            total += (loss_plus.detach() + loss_minus.detach()).float().to(total.device)
    return total / (2 * num_perturbations)

"""``ZOOptimizer``: a stateless ``torch.optim.Optimizer`` whose ``step()`` applies the seeded ZO update.

HF's loop calls ``optimizer.step()`` once per optimizer step (after the gradient-accumulation
micro-batches) and its LR schedulers write ``param_groups[0]["lr"]``: both drive the ZO update unchanged.
The only state is a few bytes per step: the sparse thresholds and the trajectory (seed, projected
gradients, lr), which fully determine the fine-tuned weights given the base model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from .engine import ZOEngine, check_finite_weights, first_non_finite  # noqa: F401  (re-exported)
from .methods import ZOMethod

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a NaN/inf loss, or as soon as the weights became non-finite."""


# A projected gradient of exactly 0 this many steps in a row means L(w + eps z) == L(w - eps z) bit for bit: the loss
# no longer responds to the weights (saturated by a huge learning rate, or nothing is perturbed). Warned about.
DEAD_RUN_STEPS = 10


@torch.no_grad()
def update_coefficients(values: list[float], lr: float, num_perturbations: int) -> list[float]:
    """The coefficients of ``ZOEngine.update`` for one step: ``lr * g_k / n``.

    Training and ``zo-replay`` both go through this one function, so a replayed update is the same
    float arithmetic as the trained one (bit-exact on the same device).
    """
    return [lr * v / num_perturbations for v in values]


@torch.no_grad()
def weights_fingerprint(engine: ZOEngine) -> list[float]:
    """``[sum(t), sum(|t|)]`` over every target, in float64: tells two models' trained tensors apart cheaply.

    Not bit-exact across reduction orders; compare with a relative tolerance (``fingerprints_match``).
    """
    total = torch.zeros(2, dtype=torch.float64, device=engine.targets[0].get().device)
    for target in engine.targets:
        tensor = target.get()
        total[0] += tensor.sum(dtype=torch.float64).to(total.device)
        total[1] += tensor.abs().sum(dtype=torch.float64).to(total.device)
    return total.tolist()


def fingerprints_match(a, b, rel: float = 1e-6) -> bool:
    return all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(a, b)) and len(a) == len(b)


class ZOOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        engine: ZOEngine,
        method: ZOMethod,
        lr: float,
        num_perturbations: int,
        max_skipped_steps: int,
        data_parallel: bool | None = None,
    ):
        """``data_parallel``: all-reduce the projected gradients across the default process group. ``None``: do so
        whenever torch.distributed is initialized with more than one process."""
        # The tensors are listed for HF's bookkeeping only; updates go through the engine.
        super().__init__([t.get() for t in engine.targets], {"lr": lr})
        self.data_parallel = data_parallel
        self.engine = engine
        self.method = method
        self.num_perturbations = num_perturbations
        self.max_skipped_steps = max_skipped_steps
        self.trajectory: list[dict[str, Any]] = []
        self._seeds: list[int | None] = [None] * num_perturbations
        self._sums: torch.Tensor | None = None  # Sum over micro-batches of the projected gradient, per direction.
        self._counts = 0
        self.consecutive_skips = 0
        self._logged_sum = 0.0
        self._logged_count = 0
        self._global_step: int | None = None  # HF's global_step once the pending step is applied.
        self.base_fingerprint: list[float] | None = None  # Of the weights before the first step (zo-replay checks it).
        self.communicated_bytes = 0  # Bytes this process put into all_reduce (data parallel only).
        self.consecutive_zero_gradients = 0
        self._window_steps = 0  # Optimizer steps since the last log, and how many of them were skipped.
        self._window_skips = 0

    def accumulate(self, index: int, seed: int, projected_gradient: torch.Tensor, step: int | None = None) -> None:
        """Record micro-batch estimate ``projected_gradient`` of direction ``index`` (seed ``seed``).

        ``step``: HF's ``state.global_step`` while the step is computed (0 for the first), for the records and warnings.
        """
        if step is not None:
            self._global_step = step + 1
        if self._sums is None:
            self._sums = torch.zeros(self.num_perturbations, dtype=torch.float64, device=projected_gradient.device)
        if self._seeds[index] not in (None, seed):
            raise RuntimeError("Perturbation seed changed within one optimizer step.")
        self._seeds[index] = seed
        self._sums[index] += projected_gradient.to(torch.float64)
        if index == 0:
            self._counts += 1

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch API
        if self._sums is None:
            return None
        projected = self._sums / self._counts
        data_parallel = self.data_parallel
        if data_parallel is None:
            data_parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if data_parallel:
            # Data-parallel ZO: the only communication is these n floats.
            dist.all_reduce(projected, op=dist.ReduceOp.SUM)
            projected /= dist.get_world_size()
            self.communicated_bytes += projected.numel() * projected.element_size()
        projected = self.method.clip(projected)
        values = projected.tolist()  # The one host sync of a step: alpha of the in-place update needs floats.
        seeds = list(self._seeds)
        self._sums, self._counts = None, 0
        self._seeds = [None] * self.num_perturbations
        lr = self.param_groups[0]["lr"]
        global_step, self._global_step = self._global_step, None
        record: dict[str, Any] = {"seeds": seeds, "projected_gradients": values, "lr": lr}
        if global_step is not None:
            record = {"global_step": global_step, **record}
        self._window_steps += 1
        if not all(math.isfinite(v) for v in values):
            self.consecutive_skips += 1
            self._window_skips += 1
            where = f"global step {global_step}" if global_step is not None else f"step {len(self.trajectory) + 1}"
            bad = first_non_finite((t.name, t.get()) for t in self.engine.targets)
            if bad is not None:  # Skipping cannot help: every later step would be non-finite too.
                self.trajectory.append({**record, "skipped": True})
                raise NonFiniteLossError(
                    f"the weights became non-finite (tensor {bad!r} holds NaN/inf), so the loss at {where} is "
                    f"non-finite; the update of the step before diverged (learning rate {lr:g} too large?). Stopping."
                )
            logger.warning(
                "ZO update at %s skipped: non-finite loss (projected gradients %s); weights unchanged "
                "(%d consecutive skip(s), limit zo_max_skipped_steps=%d).",
                where,
                values,
                self.consecutive_skips,
                self.max_skipped_steps,
            )
            self.trajectory.append({**record, "skipped": True})
            if self.consecutive_skips >= self.max_skipped_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} consecutive ZO steps (up to {where}) had a non-finite loss "
                    f"(zo_max_skipped_steps={self.max_skipped_steps}); stopping with the weights of the last good "
                    "step. Lower the learning rate or zo_eps, or check the data. Checkpoints already written are intact."
                )
            return None
        self.consecutive_skips = 0
        if all(v == 0.0 for v in values):
            self.consecutive_zero_gradients += 1
            if self.consecutive_zero_gradients == DEAD_RUN_STEPS:
                logger.warning(
                    "The projected gradient was exactly 0 for %d steps in a row (up to global step %s): "
                    "L(w + eps z) == L(w - eps z) bit for bit, so training no longer moves the weights. The loss is "
                    "saturated (learning rate %g too large? weights huge?) or zo_eps is too small for the dtype.",
                    DEAD_RUN_STEPS,
                    global_step,
                    lr,
                )
        else:
            self.consecutive_zero_gradients = 0
        coefficients = update_coefficients(values, lr, self.num_perturbations)
        limit = self._largest_finite()
        if any(not abs(c) <= limit for c in coefficients):  # torch would refuse the alpha half-way through the update.
            self.trajectory.append({**record, "skipped": True})
            where = f"global step {global_step}" if global_step is not None else f"step {len(self.trajectory)}"
            raise NonFiniteLossError(
                f"the update at {where} (learning rate {lr:g} x projected gradient {values}) overflows the weights' "
                f"dtype (largest finite value {limit:g}): the learning rate is far too large. The weights were not "
                "changed."
            )
        self.engine.update(seeds, coefficients, lr=lr)
        self.trajectory.append(record)
        self._logged_sum += sum(values) / len(values)
        self._logged_count += 1
        return None

    def pop_logged_projected_gradient(self) -> float | None:
        """Mean projected gradient over the steps since the last call."""
        if not self._logged_count:
            return None
        value = self._logged_sum / self._logged_count
        self._logged_sum, self._logged_count = 0.0, 0
        return value

    def _largest_finite(self) -> float:
        if getattr(self, "_finite_limit", None) is None:
            dtypes = {t.get().dtype for t in self.engine.targets if t.get().is_floating_point()}
            self._finite_limit = min((torch.finfo(d).max for d in dtypes), default=math.inf)
        return self._finite_limit

    def pop_window_skips(self) -> tuple[int, int]:
        """(skipped steps, optimizer steps) since the last call: a logging window made only of skips has no loss."""
        counts = (self._window_skips, self._window_steps)
        self._window_skips = self._window_steps = 0
        return counts

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # There are no gradients.

    def state_dict(self) -> dict[str, Any]:
        return {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "thresholds": self.engine.thresholds(),
            "trajectory": self.trajectory,
            "consecutive_skips": self.consecutive_skips,
            "consecutive_zero_gradients": self.consecutive_zero_gradients,
            "base_fingerprint": self.base_fingerprint,
            "noise": self.engine.noise_config(),  # How z is drawn: a resumed run keeps drawing it the same way.
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.engine.load_thresholds(state_dict.get("thresholds", {}))
        self.engine.load_noise_config(state_dict.get("noise"))  # Absent: a checkpoint of z scheme 1.
        self.trajectory = list(state_dict.get("trajectory", []))
        self.consecutive_skips = state_dict.get("consecutive_skips", 0)
        self.consecutive_zero_gradients = state_dict.get("consecutive_zero_gradients", 0)
        self.base_fingerprint = state_dict.get("base_fingerprint")

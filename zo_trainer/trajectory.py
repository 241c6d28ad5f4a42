"""ZO trajectories: the few bytes per step that rebuild the fine-tuned weights from the base model.

Saving, loading and replaying them (library code, used by ``ZOTrainer`` and by the ``zo-replay`` program in
``zo_trainer.cli.replay``).

A ZO update is ``t -= lr * g_k / n * z_k`` with ``z_k`` regenerated from a seed, so the whole run is the
base model plus, per step, the seeds, the n projected gradients ``g_k`` and the learning rate.
``ZOTrainer`` writes them as ``zo_trajectory.json`` into every checkpoint and into ``output_dir``;

    zo-replay --base <model> --trajectory out/zo_trajectory.json --output_dir replayed

runs the same ``ZOEngine`` updates on the base weights and saves the result with ``save_pretrained``.
On the device (and dtype) that trained, the replayed weights equal the trained ones bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .engine import ZOEngine
from .methods import ZOMethod, get_method
from .optim import fingerprints_match, update_coefficients, weights_fingerprint

if TYPE_CHECKING:
    from .trainer import ZOTrainer

logger = logging.getLogger(__name__)

TRAJECTORY_NAME = "zo_trajectory.json"
FORMAT = "zo_trainer.trajectory"
# 2: "noise" records the z scheme (engine.noise_config); older readers would replay another z. 3: "noise" may name a
# non-Gaussian z distribution; runs with Gaussian z still write 2 (a version-2 reader replays them exactly).
VERSION = 3


class TrajectoryError(ValueError):
    """A trajectory file that is missing, corrupt, or does not fit the base model."""


# ----- writing -------------------------------------------------------------------------------------
def _json_float(value: Any) -> Any:
    """Strict JSON has no NaN/inf: non-finite numbers become strings ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json_float(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) written as a string: the file is always strict JSON."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return value


def _resume_state(trainer: ZOTrainer, optimizer: Any) -> dict[str, Any]:
    """What ``--save_only_model`` would otherwise lose: the LR schedule's position and the optimizer's counters."""
    scheduler = getattr(trainer, "lr_scheduler", None)
    scheduler_state = None
    if scheduler is not None:
        try:
            scheduler_state = _json_safe(scheduler.state_dict())
            json.dumps(scheduler_state, allow_nan=False)
        except (TypeError, ValueError):  # A scheduler with non-JSON state: resuming it needs scheduler.pt.
            scheduler_state = None
    param_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        param_groups = _json_safe(param_groups)
        json.dumps(param_groups, allow_nan=False)
    except (TypeError, ValueError):
        param_groups = None
    return {
        "lr_scheduler": scheduler_state,
        "param_groups": param_groups,
        "consecutive_skips": optimizer.consecutive_skips,
        "consecutive_zero_gradients": getattr(optimizer, "consecutive_zero_gradients", 0),
    }


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so a reader (or a crash, kill -9 included) sees the old file or the new one.

    The text goes to a temporary file in the same directory, is fsynced, then ``os.replace``d over ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # Mode as open() gives (umask), unlike mkstemp.
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # Persist the rename itself (POSIX); not available everywhere.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def trajectory_payload(trainer: ZOTrainer) -> dict[str, Any]:
    """Everything replay needs, from a ``ZOTrainer`` that has (or is) training."""
    optimizer = trainer._zo_optimizer()
    engine, method, args = trainer.zo_engine, trainer.zo_method, trainer.args
    model = trainer.model
    base = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    first = engine.targets[0].get()
    thresholds = engine.thresholds()
    from .models import lora_record
    from .quant import get_backend

    backend = get_backend(model)
    steps = []
    for record in optimizer.trajectory:
        record = dict(record)
        record["projected_gradients"] = [_json_float(v) for v in record["projected_gradients"]]
        steps.append(record)
    return {
        "format": FORMAT,
        "version": VERSION if engine.distribution != "gaussian" else 2,
        "base_model": base or None,
        "method": method.name,
        "dtype": str(first.dtype).removeprefix("torch."),
        "quantization": backend.name if backend is not None else None,  # zo-replay loads the base the same way.
        # LoRA (PEFT) runs: the adapter config and the seed zo-train initialised it from, so zo-replay adds the
        # same adapter to the base model before the updates. None for a model trained without adapters.
        "peft": lora_record(model),
        "device": first.device.type,
        "eps": args.zo_eps,
        "seed": args.seed,
        "num_perturbations": optimizer.num_perturbations,
        "sparsity": method.sparsity,
        # The method's settings (its MethodConfig) under their argument names, so replay builds the same targets.
        "method_args": {name: _json_float(value) for name, value in method.config.to_training_args().items()},
        "targets": [t.name for t in engine.targets],  # In engine order: a tensor's noise stream depends on its index.
        "num_trained_entries": engine.total_numel,
        "thresholds": thresholds if any(v is not None for v in thresholds.values()) else None,
        # How z is drawn (scheme; CPU streams); replay draws it the same way even if the defaults change.
        # Files without "scheme" were written by scheme 1.
        "noise": engine.noise_config(),
        "base_fingerprint": optimizer.base_fingerprint,
        "fingerprint": weights_fingerprint(engine),
        "global_step": trainer.state.global_step,
        # The rest of the ZO state, so a checkpoint without optimizer.pt (--save_only_model) resumes exactly.
        "resume": _resume_state(trainer, optimizer),
        "steps": steps,
    }


def dumps_trajectory(payload: dict[str, Any]) -> str:
    """Compact JSON, one step per line (diffable, streamable); ``python -m json.tool`` pretty-prints it."""
    payload = _json_safe(payload)  # NaN/inf (a diverged run's fingerprint, a skipped step) never break the save.
    header = {k: v for k, v in payload.items() if k != "steps"}
    lines = [json.dumps(step, separators=(",", ":"), allow_nan=False) for step in payload["steps"]]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False)[:-1]
    return head + ',"steps":[\n' + ",\n".join(lines) + "\n]}\n"


def save_trajectory(trainer: ZOTrainer, output_dir: str | os.PathLike) -> str | None:
    """Write ``<output_dir>/zo_trajectory.json`` atomically (main process only); returns its path."""
    if not trainer.is_zo or not trainer.args.should_save or trainer.optimizer is None:
        return None
    path = os.path.join(os.fspath(output_dir), TRAJECTORY_NAME)
    write_json_atomic(path, dumps_trajectory(trajectory_payload(trainer)))
    return path


# ----- reading and replaying ---------------------------------------------------------------------
def load_trajectory(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TRAJECTORY_NAME)
    if not os.path.isfile(path):
        raise TrajectoryError(f"No trajectory file at {path!r} (ZOTrainer writes {TRAJECTORY_NAME} into checkpoints).")
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except json.JSONDecodeError as e:
        raise TrajectoryError(f"{path} is not a complete trajectory file: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrajectoryError(f"{path} is not a zo_trainer trajectory (no format={FORMAT!r}).")
    if payload.get("version", 0) > VERSION:
        raise TrajectoryError(f"{path} has format version {payload['version']}; this zo_trainer reads <= {VERSION}.")
    try:
        for record in payload["steps"]:
            record["projected_gradients"] = [_from_json_float(v) for v in record["projected_gradients"]]
            record["lr"] = _from_json_float(record["lr"])
        for key in ("base_fingerprint", "fingerprint"):
            if payload.get(key) is not None:
                payload[key] = [_from_json_float(v) for v in payload[key]]
    except (KeyError, TypeError, ValueError) as e:
        raise TrajectoryError(f"{path} has a malformed step record ({e!r}).") from None
    return payload


def build_method(payload: dict[str, Any]) -> ZOMethod:
    """The method that trained, with the settings the trajectory recorded (older files: sparsity only)."""
    method_class = get_method(payload["method"])
    recorded = {name: _from_json_float(value) for name, value in (payload.get("method_args") or {}).items()}
    recorded.setdefault("zo_sparsity", payload.get("sparsity"))
    return method_class(method_class.config_class.from_training_args(recorded))


@torch.no_grad()
def replay(
    model: nn.Module,
    payload: dict[str, Any],
    steps: int | None = None,
    verify: bool = True,
    recompute_thresholds: bool = False,
) -> ZOEngine:
    """Apply the trajectory's updates to ``model`` (the base model) in place; returns the engine used.

    ``steps``: replay only the updates up to this global step. ``verify``: check that ``model`` is the base
    the trajectory started from (and, for a full replay, that it ends at the saved weights).
    """
    method = build_method(payload)
    targets = method.targets(model)  # Before any requires_grad change: MeZO selects by requires_grad.
    if payload.get("targets") is not None:  # Exactly the tensors that trained (some may have been frozen).
        by_name = {t.name: t for t in targets}
        missing = [name for name in payload["targets"] if name not in by_name]
        if missing:
            raise TrajectoryError(f"The base model has no tensor(s) {missing[:5]} that the trajectory trained.")
        targets = [by_name[name] for name in payload["targets"]]
    engine = ZOEngine(targets)
    try:
        engine.load_noise_config(payload.get("noise"))
    except ValueError as error:
        engine.remove()
        raise TrajectoryError(str(error)) from None
    try:
        if verify and payload.get("base_fingerprint") is not None:
            found = weights_fingerprint(engine)
            if not fingerprints_match(found, payload["base_fingerprint"]):
                raise TrajectoryError(
                    f"The base model does not match the trajectory's start (fingerprint {found} vs "
                    f"{payload['base_fingerprint']}): pass the model training started from "
                    f"({payload.get('base_model')!r}), in dtype {payload.get('dtype')}."
                )
        if method.sparsity > 0:
            if payload.get("thresholds") and not recompute_thresholds:
                engine.load_thresholds(payload["thresholds"])
            else:  # As ZOCallback does before the first step: from the base weights.
                engine.set_thresholds(method.sparsity, select=method.is_sparsified)
        num_perturbations = payload["num_perturbations"]
        applied = 0
        for index, record in enumerate(payload["steps"]):
            if steps is not None and record.get("global_step", index + 1) > steps:
                break
            if record.get("skipped"):
                continue
            coefficients = update_coefficients(record["projected_gradients"], record["lr"], num_perturbations)
            engine.update(record["seeds"], coefficients, lr=record["lr"])
            applied += 1
        logger.info("Replayed %d ZO updates (%s) on %d tensors.", applied, payload["method"], len(engine.targets))
        full = steps is None or steps >= payload.get("global_step", 0)
        if verify and full and payload.get("fingerprint") is not None:
            found = weights_fingerprint(engine)
            if not fingerprints_match(found, payload["fingerprint"]):
                raise TrajectoryError(
                    f"Replayed weights do not match the trained ones (fingerprint {found} vs {payload['fingerprint']}). "
                    f"Replay on the device that trained ({payload.get('device')}) in dtype {payload.get('dtype')}."
                )
    finally:
        engine.remove()
    return engine

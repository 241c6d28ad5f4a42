"""Data-parallel ZO: 2 CPU processes (gloo) under torchrun against one process with the same global batch.

The test launches this file as the worker: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py <workdir> <rte_dir>``. Each rank counts every torch.distributed collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 4
PER_DEVICE_BATCH = 2
WORLD_SIZE = 2
NUM_PERTURBATIONS = 2
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
)


def _settings(output_dir: str, batch: int) -> dict:
    return dict(
        output_dir=output_dir,
        optim="mezo",
        zo_num_perturbations=NUM_PERTURBATIONS,
        learning_rate=1e-3,
        max_steps=STEPS,
        per_device_train_batch_size=batch,
        lr_scheduler_type="constant",
        logging_steps=STEPS,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        seed=7,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )


def _data(tokenizer, rte_dir):
    from zo_trainer.data import load_task_splits, prepare_dataset
    from zo_trainer.tasks import get_task

    task = get_task("rte")
    splits = load_task_splits(task, rte_dir, num_train=16, num_dev=4, num_eval=4, data_seed=0)
    return {k: prepare_dataset(tokenizer, task, v, max_length=96) for k, v in splits.items()}


def _trainer(model, tokenizer, data, settings):
    from zo_trainer import ZOTrainer, ZOTrainingArguments
    from zo_trainer.data import CandidateCollator

    return ZOTrainer(
        model=model,
        args=ZOTrainingArguments(**settings),
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=CandidateCollator(tokenizer),
    )


def worker(workdir: Path, rte_dir: Path) -> None:
    """One rank: count collectives per optimizer step, train, dump weights + counts."""
    import faulthandler

    import torch.distributed as dist
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

    faulthandler.dump_traceback_later(float(os.environ.get("ZO_WORKER_TIMEOUT", 150)), exit=True)  # Never hang CI.
    torch.set_num_threads(1)
    log: list[tuple[str, int]] = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            size = tensor.numel() * tensor.element_size() if tensor is not None else 0  # Per process, sent.
            log.append((name, size))
            return fn(*args, **kwargs)

        return wrapper

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(name, getattr(dist, name)))

    steps: list[list[tuple[str, int]]] = []

    class PerStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = len(log)

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(log[self.start :])

    tokenizer = AutoTokenizer.from_pretrained(workdir / "base")
    model = LlamaForCausalLM.from_pretrained(workdir / "base")
    trainer = _trainer(model, tokenizer, _data(tokenizer, rte_dir), _settings(str(workdir / "ddp"), PER_DEVICE_BATCH))
    trainer.add_callback(PerStep())
    trainer.train()
    rank = dist.get_rank()
    optimizer = trainer._zo_optimizer()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, workdir / f"weights_{rank}.pt")
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "wrapped": type(trainer.model_wrapped).__name__,
        "per_step": steps,
        "all": log,
        "communicated_bytes": optimizer.communicated_bytes,
        "trajectory": optimizer.trajectory,
        "requires_grad": any(p.requires_grad for p in model.parameters()),
    }
    # Ranks that start from different weights are refused before any step.
    other = LlamaForCausalLM.from_pretrained(workdir / "base")
    if rank == 1:
        with torch.no_grad():
            other.model.norm.weight.add_(1e-3)
    mismatched = _trainer(
        other, tokenizer, _data(tokenizer, rte_dir), _settings(str(workdir / "bad"), PER_DEVICE_BATCH)
    )
    try:
        mismatched.train()
        report["mismatch_error"] = None
    except RuntimeError as error:
        report["mismatch_error"] = str(error)
    (workdir / f"report_{rank}.json").write_text(json.dumps(report))


def test_two_process_data_parallel_zo(tmp_path, rte_dir, tiny_tokenizer, tiny_llama_factory):
    base = tmp_path / "base"
    tiny_llama_factory(seed=0).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path.cwd())}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD_SIZE),
        __file__,
        str(tmp_path),
        str(rte_dir),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]

    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in range(WORLD_SIZE)]
    weights = [torch.load(tmp_path / f"weights_{r}.pt") for r in range(WORLD_SIZE)]
    # Both ranks: same trajectory, bit-identical weights; no DDP wrapper, nothing requires grad.
    assert reports[0]["trajectory"] == reports[1]["trajectory"] and len(reports[0]["trajectory"]) == STEPS
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    for report in reports:
        assert report["world_size"] == WORLD_SIZE and report["wrapped"] == "LlamaForCausalLM"
        assert not report["requires_grad"]
        # Per optimizer step the only collective is the all_reduce of the n projected gradients: n float64.
        assert len(report["per_step"]) == STEPS
        for ops in report["per_step"]:
            assert ops == [["all_reduce", 8 * NUM_PERTURBATIONS]], ops
        assert report["communicated_bytes"] == STEPS * 8 * NUM_PERTURBATIONS
        assert "start from different weights" in report["mismatch_error"]
    # Only rank 0 writes checkpoints and the trajectory; it holds the whole run.
    saved = json.loads((tmp_path / "ddp" / "zo_trajectory.json").read_text())
    assert [s["seeds"] for s in saved["steps"]] == [r["seeds"] for r in reports[0]["trajectory"]]
    assert (tmp_path / "ddp" / "checkpoint-2" / "zo_trajectory.json").is_file()

    # One process with the same global batch (2 x 2): the same steps up to float rounding.
    from transformers import LlamaForCausalLM

    single = LlamaForCausalLM.from_pretrained(base)
    trainer = _trainer(
        single,
        tiny_tokenizer,
        _data(tiny_tokenizer, rte_dir),
        _settings(str(tmp_path / "single"), PER_DEVICE_BATCH * WORLD_SIZE),
    )
    trainer.train()
    reference = trainer._zo_optimizer().trajectory
    for ddp, one in zip(reports[0]["trajectory"], reference):
        assert ddp["seeds"] == one["seeds"]
        assert ddp["projected_gradients"] == pytest.approx(one["projected_gradients"], rel=1e-3, abs=1e-4)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

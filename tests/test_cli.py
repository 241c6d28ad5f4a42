"""``zo-train`` end to end on the real SmolLM2-135M-Instruct and real RTE, plus its argument handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from zo_trainer.train import main, parse_args

pytestmark = pytest.mark.slow


def tiny_run_flags(rte_dir, output_dir, optim, *extra):
    return [
        "--task", "rte", "--data_dir", str(rte_dir), "--optim", optim,
        "--max_steps", "2", "--num_train", "8", "--num_dev", "4", "--num_eval", "8",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--max_length", "96", "--learning_rate", "1e-4", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--output_dir", str(output_dir), *extra,
    ]


@pytest.fixture(scope="module")
def base_weights():
    from zo_trainer.models import ensure_default_model

    return load_file(str(ensure_default_model() / "model.safetensors"))


@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_zo_train_on_smollm2(tmp_path, rte_dir, base_weights, optim):
    metrics = main(tiny_run_flags(rte_dir, tmp_path, optim))
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["test_accuracy"] <= 1.0
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(h["zo_projected_grad"]) for h in history if "zo_projected_grad" in h)
    trained = load_file(str(tmp_path / "model.safetensors"))  # Saved by save_model, loadable by from_pretrained.
    changed = {k for k in base_weights if not torch.equal(base_weights[k], trained[k])}
    assert changed
    if optim == "mezo":
        assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    else:
        assert all(".layers." in k and k.endswith("_proj.weight") for k in changed)
        for key in changed:
            moved = base_weights[key] != trained[key]
            assert moved.float().mean() <= 0.21
            # Only the small-magnitude entries moved (threshold = 20% quantile of |W| at start).
            assert base_weights[key].abs()[moved].max() <= base_weights[key].abs().flatten().kthvalue(
                math.ceil(0.2 * base_weights[key].numel())).values
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is not None


def test_config_file_and_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: rte\noptim: sparse_mezo\nzo_eps: 0.01\nmax_steps: 5\noutput_dir: somewhere\n")
    model_args, data_args, args = parse_args([str(config), "--max_steps", "7"])
    assert args.optim == "sparse_mezo" and args.zo_eps == 0.01 and args.max_steps == 7
    assert args.output_dir == "somewhere" and data_args.task == "rte" and model_args.model_name_or_path is None
    assert args.do_train and args.do_eval


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (["--task", "nope"], ValueError, "rte"),
        (["--data_dir", "/no/such/dir"], FileNotFoundError, "/no/such/dir"),
        (["--optim", "mezo", "--fp16", "true"], ValueError, "bf16"),
        (["--optim", "mezo", "--zo_eps", "0"], ValueError, "zo_eps"),
        (["--model_name_or_path", "./no/such/model"], FileNotFoundError, "does not exist"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, rte_dir, flags, error, message):
    base = ["--task", "rte", "--data_dir", str(rte_dir), "--num_train", "8", "--num_dev", "4", "--num_eval", "4",
            "--output_dir", str(tmp_path), "--report_to", "none"]
    with pytest.raises(error, match=message):
        main(base + flags)
    assert not (tmp_path / "model.safetensors").exists()


def test_unknown_optim_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--optim", "sgd_zero", "--output_dir", str(tmp_path)])

"""``zo-train --use_peft`` (TRL's flag names) as a user runs it: LoRA adapters trained by ZO and first-order
optimizers from the command line, saved as a PEFT adapter, resumed bit-exactly, rebuilt by ``zo-replay``.

Runs the installed console scripts on the tiny random Llama folder of ``test_cli`` (a few seconds each); the input
errors, which stop before the model loads, run the script's function in this process.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import test_cli
from test_cli import assert_ok, assert_one_line_error, cli, global_step, in_process, tiny_flags

# test_cli's fixtures, shared: the tiny random Llama saved as a model folder and a small copy of RTE.
tiny_model_dir = test_cli.tiny_model_dir
small_rte_dir = test_cli.small_rte_dir

peft = pytest.importorskip("peft")

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
LORA = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
# The tiny Llama: 2 layers, hidden 32, 2 KV heads of 8 (v_proj: 32 -> 16). LoRA r=4 on q_proj and v_proj:
# per layer A 4x32 + B 32x4 (q) and A 4x32 + B 16x4 (v).
LORA_ENTRIES = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
ADAPTER = "adapter_model.safetensors"


def lora_flags(model_dir, data_dir, output_dir, *extra):
    """4 mezo steps on LoRA adapters, a linear LR decay (a restarted schedule would show), checkpoints at 2 and 4."""
    return tiny_flags(
        model_dir,
        data_dir,
        output_dir,
        *LORA,
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "linear",
        "--save_steps",
        "2",
        *extra,
        steps=4,
    )


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER))


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(found[name], value), name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, small_rte_dir):
    """One uninterrupted LoRA run through the installed zo-train: (output_dir, its stderr)."""
    out = tmp_path_factory.mktemp("lora") / "out"
    result = cli("zo-train", *lora_flags(tiny_model_dir, small_rte_dir, out))
    assert_ok(result)
    return out, result.stderr


def test_a_mezo_lora_run_saves_a_peft_adapter_that_peft_reloads(lora_run, tiny_model_dir):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    out, stderr = lora_run
    assert global_step(out) == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 32, "CAUSAL_LM")  # TRL's alpha default
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert not (out / "model.safetensors").exists()  # Only the adapter is saved: the base never changed.
    trained = adapter(out)
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert sum(t.numel() for t in trained.values()) == LORA_ENTRIES
    assert f"trainable params: {LORA_ENTRIES} ||" in stderr  # The count logged when the adapter was added.
    trajectory = json.loads((out / "zo_trajectory.json").read_text())
    assert trajectory["num_trained_entries"] == LORA_ENTRIES
    assert trajectory["peft"]["init_seed"] == 7 and trajectory["peft"]["adapters"]["default"]["r"] == 4

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert_same_tensors(get_peft_model_state_dict(reloaded), trained)


def test_zo_replay_rebuilds_the_lora_adapter_bit_exactly(lora_run, tmp_path, capsys):
    out, _ = lora_run
    assert_ok(cli("zo-replay", "--trajectory", out, "--output_dir", tmp_path / "rebuilt"))
    trained = adapter(out)
    assert_same_tensors(adapter(tmp_path / "rebuilt"), trained)

    from zo_trainer.cli import replay

    # Replayed to step 0: the adapter as zo-train initialised it. Every LoRA tensor moved in training (mezo trains
    # all of them), lora_B from PEFT's zeros.
    assert_ok(in_process(capsys, replay.main, "--trajectory", out, "--output_dir", tmp_path / "start", "--steps", 0))
    start = adapter(tmp_path / "start")
    assert all(not start[name].any() for name in start if ".lora_B." in name)
    assert all(not torch.equal(start[name], trained[name]) for name in trained)

    # Adapters made outside zo-train (the notebook API) have no recorded init seed: refused, not silently wrong.
    payload = json.loads((out / "zo_trajectory.json").read_text())
    payload["peft"]["init_seed"] = None
    (tmp_path / "notebook.json").write_text(json.dumps(payload))
    result = in_process(capsys, replay.main, "--trajectory", tmp_path / "notebook.json", "--output_dir", tmp_path / "x")
    assert_one_line_error(result, 2, "zo-train did not create", "--use_peft", prog="zo-replay")


def test_a_lora_run_resumes_bit_exactly_and_refuses_other_lora_settings(
    lora_run, tmp_path, tiny_model_dir, small_rte_dir, capsys
):
    reference, _ = lora_run
    out = tmp_path / "out"
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    result = cli("zo-train", *lora_flags(tiny_model_dir, small_rte_dir, out, "--resume_from_checkpoint", "true"))
    assert_ok(result)
    assert global_step(out) == 4
    assert_same_tensors(adapter(out), adapter(reference))
    expected = json.loads((reference / "zo_trajectory.json").read_text())["steps"]
    assert json.loads((out / "zo_trajectory.json").read_text())["steps"] == expected

    other = tmp_path / "other"
    shutil.copytree(reference / "checkpoint-2", other / "checkpoint-2")
    resume = lora_flags(tiny_model_dir, small_rte_dir, other, "--resume_from_checkpoint", "true")
    assert_one_line_error(
        in_process(capsys, None, *resume, "--lora_r", "8", "--lora_alpha", "16"),
        2,
        "r 4 in the checkpoint, 8 now",
        "lora_alpha 32 in the checkpoint, 16 now",
    )
    without = [flag for flag in resume if flag != "--use_peft"]
    assert_one_line_error(in_process(capsys, None, *without), 2, "holds LoRA adapters", "add --use_peft")
    assert not (other / "checkpoint-4").exists()


def test_first_order_lora_trains_peft_default_targets(tmp_path, tiny_model_dir, small_rte_dir):
    out = tmp_path / "adamw"
    flags = tiny_flags(tiny_model_dir, small_rte_dir, out, "--optim", "adamw_torch", "--use_peft", "--lora_r", "4")
    assert_ok(cli("zo-train", *flags, "--learning_rate", "1e-2", "--save_strategy", "no"))
    assert global_step(out) == 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # PEFT's default for Llama.
    trained = adapter(out)
    assert all(trained[name].any() for name in trained if ".lora_B." in name)  # Moved from PEFT's zeros.
    assert not (out / "model.safetensors").exists() and not (out / "zo_trajectory.json").exists()


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("lora_r_0", ["--lora_r 0", "positive integer"]),
        ("qzo", ["--optim qzo with --use_peft", "--optim mezo or sparse_mezo"]),
        ("no_peft", ["--use_peft needs the peft package", "pip install"]),
        ("task_type", ["--lora_task_type SEQ_CLS", "CAUSAL_LM"]),
        ("no_such_module", ["--use_peft: Target modules {'no_such_proj'} not found"]),
        ("gptq_checkpoint", ["--use_peft on the quantized checkpoint", "--quantization nf4 (QLoRA)"]),
    ],
)
def test_bad_lora_input_is_one_line_exit_2(
    tmp_path, tiny_model_dir, small_rte_dir, case, fragments, capsys, monkeypatch
):
    out = tmp_path / "out"
    flags = tiny_flags(tiny_model_dir, small_rte_dir, out, "--use_peft")
    if case == "lora_r_0":  # Through the installed script.
        result = cli("zo-train", *flags, "--lora_r", "0")
    else:
        extra = {
            "qzo": ["--optim", "qzo"],
            "no_peft": [],
            "task_type": ["--lora_task_type", "SEQ_CLS"],
            "no_such_module": ["--lora_target_modules", "no_such_proj"],
            "gptq_checkpoint": [],
        }[case]
        if case == "no_peft":
            monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as when not installed.
        if case == "gptq_checkpoint":  # What zo-quantize writes into config.json; refused before the weights load.
            gptq = tmp_path / "gptq"
            shutil.copytree(tiny_model_dir, gptq)
            config = json.loads((gptq / "config.json").read_text())
            config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}
            (gptq / "config.json").write_text(json.dumps(config))
            extra = ["--model_name_or_path", gptq]
        result = in_process(capsys, None, *flags, *extra)
    assert_one_line_error(result, 2, *fragments)
    assert not (out / ADAPTER).exists() and not (out / "checkpoint-1").exists()


@pytest.mark.quant
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not importable: run scripts/install_quant.sh")
def test_qlora_from_the_command_line_trains_and_replays(tmp_path, tiny_model_dir, small_rte_dir):
    """--quantization nf4 --use_peft: LoRA over a frozen NF4 base (QLoRA) with mezo; zo-replay loads the base in NF4."""
    out = tmp_path / "qlora"
    assert_ok(cli("zo-train", *tiny_flags(tiny_model_dir, small_rte_dir, out, *LORA, "--quantization", "nf4")))
    assert json.loads((out / "zo_trajectory.json").read_text())["quantization"] == "nf4"
    assert not (out / "model.safetensors").exists()
    assert_ok(cli("zo-replay", "--trajectory", out, "--output_dir", tmp_path / "rebuilt"))
    assert_same_tensors(adapter(tmp_path / "rebuilt"), adapter(out))


def test_lora_flags_have_trl_defaults_and_work_from_a_config_file(tmp_path, caplog):
    from zo_trainer.cli.train import parse_args

    model_args, _, _ = parse_args(["--output_dir", str(tmp_path / "out")])
    defaults = (model_args.use_peft, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout)
    assert defaults == (False, 16, 32, 0.05)  # TRL's ModelConfig defaults.
    assert (model_args.lora_target_modules, model_args.lora_modules_to_save, model_args.lora_task_type) == (
        None,
        None,
        "CAUSAL_LM",
    )
    config = tmp_path / "lora.yaml"
    config.write_text("optim: mezo\nuse_peft: true\nlora_r: 8\nlora_target_modules: [q_proj, v_proj]\n")
    model_args, _, args = parse_args([str(config), "--lora_alpha", "16", "--output_dir", str(tmp_path / "out")])
    assert model_args.use_peft and args.optim == "mezo"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (8, 16, ["q_proj", "v_proj"])
    parse_args(["--lora_r", "8", "--output_dir", str(tmp_path / "out")])
    assert "--lora_r without --use_peft: ignored" in caplog.text

"""zo-run / zo_trainer.enable(): unmodified HF-style training scripts (tests/example_scripts/) with ZO optimizers.

The scripts are run through the installed `.venv/bin/zo-run` console script on a tiny random Llama saved to disk;
the trained weights on disk are compared with the initial ones, tensor by tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "example_scripts"
BIN = Path(sys.executable).parent
ZO_RUN = BIN / "zo-run"

WORDS = (  # noqa: SIM905 - a sentence is easier to read than a list of 35 strings
    "the cat sat on a mat while dogs ran in the park and birds sang over green trees near old houses "
    "people walk to work every day some read books others drink coffee rain falls softly at night"
).split()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _sentences(n: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 12, (n,), generator=generator).tolist()
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=generator).tolist()) for k in lengths
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny random Llama (causal LM) with its tokenizer, and the text / csv data the scripts read."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("launch")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(WORDS)], trainer=trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    make_tiny_llama(len(tokenizer), max_position_embeddings=128).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")

    (root / "train.txt").write_text("\n".join(_sentences(64, 1)) + "\n")
    (root / "valid.txt").write_text("\n".join(_sentences(16, 2)) + "\n")
    for name, n, seed in (("train.csv", 32, 3), ("valid.csv", 16, 4)):
        rows = ["sentence,label"] + [f"{s},{int('cat' in s)}" for s in _sentences(n, seed)]
        (root / name).write_text("\n".join(rows) + "\n")
    return root


COMMON = [
    "--do_train",
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--learning_rate",
    "1e-3",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--use_cpu",
    "--seed",
    "7",
    "--dataloader_num_workers",
    "0",
]


def _script_args(workdir: Path, script: str, output_dir: Path, optim_args: list[str]) -> list[str]:
    model = str(workdir / "tiny-llama")
    if script == "run_clm.py":
        data = [
            "--train_file",
            str(workdir / "train.txt"),
            "--validation_file",
            str(workdir / "valid.txt"),
            "--block_size",
            "16",
        ]
    else:
        data = ["--train_file", str(workdir / "train.csv"), "--validation_file", str(workdir / "valid.csv")]
    return ["--model_name_or_path", model, *data, *COMMON, "--do_eval", "--output_dir", str(output_dir), *optim_args]


def _run(launcher: list[str], script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        cwd=REPO,
        check=False,
    )


def _check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def _changed_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    return (before != after).float().mean().item()


@pytest.mark.parametrize("script", ["run_clm.py", "run_glue.py"])
def test_unmodified_scripts_train_with_mezo_and_sparse_mezo_through_zo_run(workdir, tmp_path, script):
    assert ZO_RUN.exists(), "zo-run is not installed in this environment: pip install -e ."
    base = load_file(workdir / "tiny-llama" / "model.safetensors")
    results = {}
    for optim, extra in (("mezo", []), ("sparse_mezo", ["--zo_sparsity", "0.75", "--zo_eps", "1e-3"])):
        out = tmp_path / optim
        result = _run([str(ZO_RUN)], script, _script_args(workdir, script, out, ["--optim", optim, *extra]))
        _check_ok(result)
        trained = load_file(out / "model.safetensors")
        results[optim] = trained
        assert (out / "zo_trajectory.json").is_file()
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        assert any("zo_projected_grad" in entry for entry in history), history
        assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0
        card = (out / "README.md").read_text()
        assert f"- zo_method: {optim}" in card and "zo_trajectory.json" in card and "- steps: 3" in card
        assert ("- zo_sparsity: 0.75" if optim == "sparse_mezo" else "- zo_sparsity: 0") in card

    decoder_linear = [n for n in base if ".layers." in n and n.endswith("_proj.weight")]
    # mezo: every float tensor of the base model moved (and the new classification head too).
    mezo = results["mezo"]
    for name, tensor in base.items():
        assert not torch.equal(mezo[name], tensor), f"mezo left {name} unchanged"
    if script == "run_glue.py":
        assert "score.weight" in mezo
    # sparse_mezo: only decoder Linear weights changed, each in at most (1 - sparsity) of its entries (+ slack:
    # the mask is rebuilt from the current weights, so entries near the threshold may enter it).
    sparse = results["sparse_mezo"]
    for name, tensor in base.items():
        fraction = _changed_fraction(tensor, sparse[name])
        if name in decoder_linear:
            assert 0.10 < fraction <= 0.25 + 0.05, f"{name}: {fraction:.3f} of the entries changed"
        else:
            assert fraction == 0.0, f"sparse_mezo changed {name}, which is not a decoder Linear weight"


def test_first_order_optim_through_zo_run_is_plain_hf(workdir, tmp_path):
    """--optim adamw_torch under zo-run gives the same weights, bit for bit, as `python script.py`.

    Causal LM with gradient accumulation: Llama accepts the loss kwargs, so HF decides how the loss is scaled for
    accumulation, a decision ZOTrainer must leave alone for first-order runs.
    """
    script = "run_clm.py"
    args = ["--optim", "adamw_torch", "--gradient_accumulation_steps", "2"]
    plain = _run([sys.executable], script, _script_args(workdir, script, tmp_path / "plain", args))
    _check_ok(plain)
    launched = _run([str(ZO_RUN)], script, _script_args(workdir, script, tmp_path / "zo", args))
    _check_ok(launched)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "zo" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    base = load_file(workdir / "tiny-llama" / "model.safetensors")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not (tmp_path / "zo" / "zo_trajectory.json").exists()
    losses = [
        [
            e["loss"]
            for e in json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
            if "loss" in e
        ]
        for run in ("plain", "zo")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert "zo_method" not in (tmp_path / "zo" / "README.md").read_text()


def test_qzo_on_a_float_model_is_refused_with_the_fix(workdir, tmp_path):
    result = _run([str(ZO_RUN)], "run_clm.py", _script_args(workdir, "run_clm.py", tmp_path / "q", ["--optim", "qzo"]))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: --optim qzo needs a 4-bit model"), result.stderr[-2000:]
    assert not (tmp_path / "q" / "model.safetensors").exists()


def test_zo_run_usage_errors_are_one_line_with_exit_2(tmp_path, capsys):
    missing = subprocess.run(
        [str(ZO_RUN), str(tmp_path / "nope.py"), "--optim", "mezo"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert (
        missing.returncode == 2
        and missing.stderr.strip() == f"zo-run: error: script {str(tmp_path / 'nope.py')!r} not found"
    )
    from zo_trainer.cli.launch import main

    assert main([]) == 2 and capsys.readouterr().err.startswith("usage: zo-run SCRIPT.py")


# --------------------------------------------------------------------------- in-process: enable() and plain Trainer


def _lm_dataset(n: int = 8, length: int = 12, vocab: int = 40) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (length,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _tiny_causal_lm():
    return make_tiny_llama(
        40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture
def enabled():
    import zo_trainer

    zo_trainer.enable()
    zo_trainer.enable()  # idempotent
    try:
        yield
    finally:
        zo_trainer.disable()


def test_plain_trainer_with_a_zo_optim_says_what_to_do(tmp_path):
    from transformers import Trainer

    from zo_trainer import ZOTrainingArguments

    assert not __import__("zo_trainer").is_enabled()
    args = ZOTrainingArguments(output_dir=str(tmp_path), optim="mezo", max_steps=1, report_to="none", use_cpu=True)
    trainer = Trainer(model=_tiny_causal_lm(), args=args, train_dataset=_lm_dataset())
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    assert "ZOTrainer" in message and "zo_trainer.enable()" in message and "zo-run" in message, message
    assert "\n" not in message


def test_enable_rebinds_the_names_scripts_import_and_disable_restores_them(enabled):
    import transformers
    import transformers.trainer
    import transformers.training_args
    from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

    import zo_trainer
    from zo_trainer import ZOTrainer, ZOTrainingArguments

    assert Trainer is ZOTrainer and transformers.trainer.Trainer is ZOTrainer
    assert (
        TrainingArguments is ZOTrainingArguments and transformers.training_args.TrainingArguments is ZOTrainingArguments
    )
    assert issubclass(Seq2SeqTrainer, ZOTrainer) and Seq2SeqTrainer.__mro__[1].__name__ == "Seq2SeqTrainer"
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--optim",
            "sparse_mezo",
            "--zo_eps",
            "1e-4",
            "--zo_sparsity",
            "0.5",
            "--report_to",
            "none",
        ]
    )
    assert (args.optim, args.zo_eps, args.zo_sparsity, args.remove_unused_columns) == ("sparse_mezo", 1e-4, 0.5, True)
    (args,) = HfArgumentParser(Seq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--optim", "qzo", "--predict_with_generate", "--report_to", "none"]
    )
    assert args.optim == "qzo" and args.predict_with_generate and args.zo_clip is None
    zo_trainer.disable()
    assert not zo_trainer.is_enabled()
    assert transformers.Trainer is transformers.trainer.Trainer and not issubclass(transformers.Trainer, ZOTrainer)
    assert not issubclass(transformers.Seq2SeqTrainingArguments, ZOTrainingArguments)
    with pytest.raises(SystemExit):  # HF's own parser rejects the ZO names again.
        HfArgumentParser(transformers.TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "o", "--optim", "mezo"]
        )


def test_seq2seq_trainer_runs_the_zo_step_after_enable(enabled, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = _tiny_causal_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        optim="mezo",
        learning_rate=1e-2,
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="steps",
        save_steps=1,
        disable_tqdm=True,
        seed=3,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=_lm_dataset())
    trainer.train()
    assert trainer.is_zo and trainer.state.global_step == 2
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "mezo must move every tensor"
    assert all(p.grad is None for p in model.parameters())
    # The model card is written by the final save_model (as a script's last step), not into checkpoints.
    assert not (tmp_path / "checkpoint-1" / "README.md").exists()
    saved_args = torch.load(tmp_path / "checkpoint-1" / "training_args.bin", weights_only=False)  # pickled variant
    assert type(saved_args).__name__ == "ZOSeq2SeqTrainingArguments" and saved_args.optim == "mezo"
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    for line in (
        "- zo_method: mezo",
        "- zo_eps: 0.001",
        "- zo_clip: none",
        "- zo_num_perturbations: 1",
        "- learning_rate: 0.01",
        "- steps: 2",
        "- seed: 3",
        "`zo_trajectory.json`",
        "- zeroth-order",
    ):
        assert line in card, (line, card)
    assert card.index("### Zeroth-order training") < card.index("### Framework versions")


def test_trl_sft_trainer_runs_the_zo_step_after_enable(enabled, tmp_path):
    """TRL imported after enable(): its trainer and config derive from ZOTrainer / ZOTrainingArguments."""
    pytest.importorskip("trl")
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from zo_trainer import ZOTrainer, ZOTrainingArguments

    assert issubclass(SFTTrainer, ZOTrainer) and issubclass(SFTConfig, ZOTrainingArguments)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>", "</s>", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]")
    model = _tiny_causal_lm()
    model.resize_token_embeddings(len(vocab))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # SFTConfig turns gradient_checkpointing on by default; with a ZO optim it is switched off, not refused.
    args = SFTConfig(
        output_dir=str(tmp_path),
        optim="sparse_mezo",
        zo_sparsity=0.8,
        max_steps=2,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_length=16,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    assert args.gradient_checkpointing is False
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"text": _sentences(16, 5)}),
    )
    trainer.train()
    assert trainer.is_zo and trainer.state.global_step == 2
    after = model.state_dict()
    for name, tensor in before.items():
        fraction = _changed_fraction(tensor, after[name])
        if ".layers." in name and name.endswith("_proj.weight"):
            assert 0.1 < fraction <= 0.25, (name, fraction)
        else:
            assert fraction == 0.0, name


def test_candidate_columns_survive_hf_default_remove_unused_columns(tmp_path, tiny_tokenizer, rte_dir):

    from zo_trainer import ZOTrainer, ZOTrainingArguments
    from zo_trainer.data import CandidateCollator, load_task_splits, prepare_dataset
    from zo_trainer.tasks import get_task

    task = get_task("rte")
    splits = load_task_splits(task, rte_dir, num_train=8, num_dev=4, num_eval=4, data_seed=0)
    train = prepare_dataset(tiny_tokenizer, task, splits["train"], max_length=96).add_column("note", ["x"] * 8)
    args = ZOTrainingArguments(
        output_dir=str(tmp_path),
        optim="mezo",
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    assert args.remove_unused_columns is True  # HF's default, kept
    trainer = ZOTrainer(
        model=make_tiny_llama(), args=args, train_dataset=train, data_collator=CandidateCollator(tiny_tokenizer)
    )
    kept = trainer._remove_unused_columns(train).column_names
    assert {"prompt_ids", "candidate_ids", "labels"} <= set(kept) and "note" not in kept
    trainer.train()
    assert trainer.state.global_step == 1


# --------------------------------------------------------------------------- data parallel, quiet imports


def test_torchrun_runs_the_script_data_parallel_with_one_layout_line(workdir, tmp_path):
    args = _script_args(workdir, "run_clm.py", tmp_path / "dp", ["--optim", "mezo", "--max_steps", "2"])
    args = [a for a in args if a not in ("--do_eval", "--use_cpu")] + ["--log_level", "info"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "zo_trainer.run",
    ]
    result = _run(command, "run_clm.py", args)
    _check_ok(result)
    output = result.stdout + result.stderr
    layout = [line for line in output.splitlines() if "ZO data parallel:" in line]
    assert len(layout) == 1, output[-4000:]  # rank 0 only: the other rank logs errors only
    assert "2 processes, backend gloo" in layout[0] and "all-reduces 8 bytes" in layout[0], layout[0]
    assert json.loads((tmp_path / "dp" / "zo_trajectory.json").read_text())["steps"][-1]["global_step"] == 2


def test_a_launch_that_asked_for_two_processes_but_runs_one_is_warned_about(workdir, tmp_path):
    accelerate = BIN / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed")
    args = _script_args(workdir, "run_clm.py", tmp_path / "one", ["--optim", "mezo", "--max_steps", "1"])
    args = [a for a in args if a != "--do_eval"]
    result = _run(
        [str(accelerate), "launch", "--num_processes", "2", "--cpu", "-m", "zo_trainer.run"], "run_clm.py", args
    )
    _check_ok(result)
    assert "asked for 2 processes but this run has 1: it is NOT data parallel" in result.stdout + result.stderr


def test_importing_zo_trainer_and_transformers_prints_nothing():
    code = "import zo_trainer, transformers\nfrom transformers import Trainer, TrainingArguments, Seq2SeqTrainer\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120, check=False
    )
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr

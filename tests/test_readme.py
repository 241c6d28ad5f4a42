"""The README is executable truth: every command of its ```bash blocks, and every file in configs/, runs.

How the README's commands are run (conventions for whoever edits the README):

* Blocks are read in document order and run in ONE scratch folder laid out like the repository root: ``configs/``,
  ``scripts/``, ``.venv/`` (links to this checkout) and ``../shared/data/superglue/rte`` (a small copy of RTE). So
  what one command writes (``smol-gptq4``, ``out/mezo``) is there for the next, as for a user going down the page.
* Commands of the project's programs run: ``zo-train``, ``zo-quantize``, ``zo-replay``, ``zo-bench``, ``zo-run``
  (with or without ``.venv/bin/``), and ``python -m zo_trainer.<program>``; leading ``VAR=value`` words are the
  environment. Other commands (``bash scripts/setup.sh``, ``pytest``, ``torchrun``, ``accelerate launch``) are not
  run; in ``a && b`` each part counts on its own. A command whose arguments contain ``...`` is a sketch: not run.
* ``<!-- readme-test: skip: <reason> -->`` on the line right before a ```bash fence skips that block.
* ``<model>``, ``<base model>``, ``<hub id or local dir>`` (any placeholder in angle brackets naming a model) become
  the tiny test model folder; any other ``<...>`` fails this test (add it to ``placeholder_value``).
* Files a command expects the user to bring (``run_clm.py``, ``run_glue.py``, ``data.txt``) are put in the scratch
  folder (the scripts from tests/example_scripts/).
* Commands are shrunk only by APPENDING flags (argparse: the last value wins): the tiny model (unless the command
  names a model folder that an earlier command wrote, e.g. ``smol-gptq4``), the small RTE copy (unless the command or
  its config file names a ``data_dir``), 2 steps, a few examples, a checkpoint every step.
* ``zo-bench`` measurement suites (speed, memory, accuracy, growth, study) take minutes to hours and are run with
  ``--quick`` by tests/test_bench.py; here their command lines are checked by zo-bench's own parser (and ``--plan``
  must be JSON). ``zo-bench report`` runs.

Outcomes checked: exit status 0; after training, ``trainer_state.json`` has ``global_step == 2``, the saved model loads
(``from_pretrained``; ``zo_trainer.quant.load_quantized`` for int4) and, where it trained the weights, differs from
the tiny base; ``zo-replay`` rebuilds the trained weights bit for bit; ``zo-quantize`` writes a GPTQ checkpoint.
A LoRA run (``--use_peft``) writes a PEFT adapter instead of a model: ``adapter_config.json`` and adapter weights
holding only ``lora_A`` / ``lora_B`` tensors, which ``PeftModel.from_pretrained`` loads, unchanged, onto the base the
command trained; every ``lora_B`` has moved from PEFT's zeros; ``zo-replay`` rebuilds the adapter bit for bit.

How the README's ```python blocks are run:

* Each block runs on its own in a fresh interpreter (the test's ``python``), as ``__main__``, in its own folder beside
  which ``../shared/data/superglue/rte`` is the small RTE copy; tracebacks name the README's own line numbers.
* Shrunk by the textual substitutions of ``PYTHON_SUBSTITUTIONS`` (the embedded model -> the tiny test model,
  ``max_steps`` -> 2, ``num_train`` / ``num_dev`` / ``num_eval`` -> 8 / 4 / 8), nothing else.
* ``<!-- readme-test: fragment -->`` on the line right before a ```python fence marks a fragment that uses names a
  notebook would already hold: ``FRAGMENT_PREAMBLE`` defines them (``model``, ``tokenizer``, ``train``, ``dev``,
  ``collator``: the tiny model and the small RTE copy). An unmarked block must run as it is.
* A block with ``...`` in its code (not in a comment or a string) is a sketch: not run. ``readme-test: skip`` as above.
* Outcomes checked (``POSTAMBLE``, run after the block in its namespace): exit status 0; a ``trainer`` it made has
  ``global_step == 2``; a block that trains (``.train()``) leaves ``model`` with weights that differ from the tiny
  base; a task it registers loads from the RTE copy and is evaluated by ``ZOTrainer``; a ``print(...)  # {'key': ...}``
  line prints those keys with numbers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROGRAMS = ("zo-train", "zo-quantize", "zo-replay", "zo-bench", "zo-run")
MODULES = {
    "zo_trainer.train": "zo-train",
    "zo_trainer.quantize": "zo-quantize",
    "zo_trainer.replay": "zo-replay",
    "benchmarks.zo_bench": "zo-bench",
    "zo_trainer.run": "zo-run",
    "zo_trainer.launch": "zo-run",
}
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.*?)\s*-->")
BENCH_SUITES_NOT_RUN = ("speed", "memory", "accuracy", "growth", "study", "all")
STEPS = 2
TRAIN_SHRINK = [
    "--max_steps",
    str(STEPS),
    "--num_train",
    "8",
    "--num_dev",
    "4",
    "--num_eval",
    "8",
    "--max_length",
    "64",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--save_steps",
    "1",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]
RUN_SHRINK = [
    "--max_steps",
    str(STEPS),
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "2",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--dataloader_num_workers",
    "0",
]
SCRIPT_SHRINK = {"run_clm.py": ["--block_size", "16"]}  # zo-run: flags of the script it starts.
QUANTIZE_SHRINK = ["--num_calibration", "4", "--max_length", "32"]


@dataclass
class Command:
    line: int  # Of the README (1-based), where the command starts.
    program: str  # zo-train, ...
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.program}-" + "_".join(a for a in self.args[:2] if not a.startswith("<"))[:40]


def fenced_blocks(text: str, language: str) -> list[tuple[int, str, str]]:
    """(first line number, body, the non-blank line before the fence) of every ```<language> block."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        if lines[index].strip() == "```" + language:
            previous = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            blocks.append((index + 2, "\n".join(lines[index + 1 : end]), previous))
            index = end
        index += 1
    return blocks


def _skip_reason(previous: str) -> str | None:
    mark = SKIP_MARK.search(previous)
    return mark.group(1) if mark else None


def bash_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(first line number, body, skip reason) of every ```bash block."""
    return [(line, body, _skip_reason(previous)) for line, body, previous in fenced_blocks(text, "bash")]


def split_commands(body: str, first_line: int) -> list[tuple[int, list[str]]]:
    """Shell words of each command of a block: line continuations joined, quotes may span lines, # comments dropped."""
    commands, buffer, start = [], "", None
    for offset, raw in enumerate(body.splitlines()):
        if start is None:
            if not raw.strip():
                continue
            start = first_line + offset
        buffer += raw + "\n"
        if buffer.rstrip("\n").endswith("\\"):
            buffer = buffer.rstrip("\n")[:-1] + " "
            continue
        try:  # A placeholder is one word even with spaces: <hub id or local dir> -> <hub_id_or_local_dir>.
            words = shlex.split(
                re.sub(r"<([^<>\n]+)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", buffer), comments=True
            )
        except ValueError:  # An open quote: the command goes on.
            continue
        for part in _split_on_operators(words):
            commands.append((start, part))
        buffer, start = "", None
    assert not buffer.strip(), f"README line {start}: unterminated command {buffer!r}"
    return commands


def _split_on_operators(words: list[str]) -> list[list[str]]:
    parts, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    return [p for p in parts + [current] if p]


def to_command(line: int, words: list[str], skip: str | None) -> Command | None:
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        return None
    name = os.path.basename(words[0])
    if name in PROGRAMS:
        program, args = name, words[1:]
    elif re.fullmatch(r"python3?", name) and len(words) > 2 and words[1] == "-m" and words[2] in MODULES:
        program, args = MODULES[words[2]], words[3:]
    else:
        return None  # Not one of the project's programs.
    if any("..." in word for word in args):
        skip = skip or "a sketch (its arguments contain ...)"
    return Command(line, program, args, env, skip)


def readme_text() -> str:
    return Path(os.environ.get("ZO_TEST_README", REPO / "README.md")).read_text(encoding="utf-8")  # Env: check a draft.


def readme_commands() -> list[Command]:
    text = readme_text()
    found = []
    for first_line, body, skip in bash_blocks(text):
        for line, words in split_commands(body, first_line):
            command = to_command(line, words, skip)
            if command is not None:
                found.append(command)
    return found


# ----- the scratch folder a user would be in --------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory, rte_dir, tiny_tokenizer):
    """(repo-like working folder, tiny model folder). Shared by all commands, in README order."""
    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("readme")
    work = root / "repo"
    work.mkdir()
    for name in ("configs", "scripts", ".venv"):
        (work / name).symlink_to(REPO / name)
    data = root / "shared" / "data" / "superglue" / "rte"
    data.mkdir(parents=True)
    for name, count in (("train.jsonl", 40), ("val.jsonl", 16)):
        lines = (rte_dir / name).read_text(encoding="utf-8").splitlines()[:count]
        (data / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for script in (REPO / "tests" / "example_scripts").glob("*.py"):
        shutil.copy(script, work / script.name)
    premises = [json.loads(line)["premise"] for line in (rte_dir / "train.jsonl").read_text().splitlines()[:60]]
    (work / "data.txt").write_text("\n".join(premises) + "\n", encoding="utf-8")
    model = root / "tiny-model"
    make_tiny_llama().save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    return work, model


def placeholder_value(placeholder: str, model: Path) -> str:
    if re.search(r"model|hub_id", placeholder):
        return str(model)
    pytest.fail(f"README placeholder {placeholder!r} has no test value: add one to placeholder_value() in {__file__}")


def _value(args: list[str], flag: str) -> str | None:
    """The value argparse would use: the last ``--flag value`` / ``--flag=value``."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _config(args: list[str], work: Path) -> dict:
    if args and args[0].endswith((".yaml", ".yml", ".json")) and (work / args[0]).is_file():
        return yaml.safe_load((work / args[0]).read_text()) or {}
    return {}


def shrunk(command: Command, work: Path, model: Path) -> list[str]:
    """The command's own arguments (placeholders filled in) plus the appended shrink flags."""
    args = [re.sub(r"<[^<>]+>", lambda m: placeholder_value(m.group(0), model), a) for a in command.args]
    config = _config(args, work)
    if command.program == "zo-train":
        named = _value(args, "--model_name_or_path") or config.get("model_name_or_path")
        extra = list(TRAIN_SHRINK)
        if not (named and (work / named).is_dir()):  # A folder an earlier command wrote is kept.
            extra += ["--model_name_or_path", str(model)]
        if _value(args, "--data_dir") is None and not config.get("data_dir"):
            extra += ["--data_dir", "../shared/data/superglue/rte"]
        return args + extra
    if command.program == "zo-run":
        script = os.path.basename(args[0]) if args else ""
        return args + RUN_SHRINK + SCRIPT_SHRINK.get(script, []) + ["--model_name_or_path", str(model)]
    if command.program == "zo-quantize":
        return args + QUANTIZE_SHRINK + ["--model_name_or_path", str(model)]
    return args


def _output_dir(args: list[str], work: Path) -> Path:
    return work / (_value(args, "--output_dir") or _config(args, work).get("output_dir") or "zo_output")


def _run(program: str, args: list[str], work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GPTQMODEL_CPU_WORKERS": "2",
        **env,
    }
    return subprocess.run(
        [str(BIN / program), *args], cwd=work, env=full_env, capture_output=True, text=True, timeout=600
    )


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _state(folder: Path) -> dict:
    """The saved weights: a PEFT adapter's where the folder holds one, else the model's."""
    adapter = folder / ADAPTER_WEIGHTS
    return load_file(str(adapter if adapter.is_file() else folder / "model.safetensors"))


def check_adapter(output_dir: Path, base: Path) -> None:
    """A LoRA run's output: only lora_A / lora_B tensors, which PEFT loads unchanged onto the base that trained."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    assert not (output_dir / "model.safetensors").exists(), "a LoRA run saved the whole model, not only the adapter"
    saved = _state(output_dir)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)
    reloaded = get_peft_model_state_dict(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(output_dir))
    )
    assert sorted(reloaded) == sorted(saved), (sorted(reloaded), sorted(saved))
    for key, value in saved.items():
        assert torch.equal(reloaded[key], value), key
    lora_b = [k for k in saved if ".lora_B." in k]  # PEFT starts every lora_B at zeros.
    assert lora_b and all(saved[k].any() for k in lora_b), "lora_B did not move from its initial zeros"


def check_trained(output_dir: Path, model: Path, args: list[str], work: Path) -> None:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS, state["global_step"]
    named = _value(args, "--model_name_or_path") or _config(args, work).get("model_name_or_path")
    base = Path(named) if named and Path(named).is_absolute() else work / (named or "")
    if (output_dir / "adapter_config.json").is_file():
        check_adapter(output_dir, base)
        return
    config = json.loads((output_dir / "config.json").read_text())
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    if quantization is None:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(output_dir)
    else:
        from zo_trainer.quant import load_quantized

        load_quantized(str(output_dir), {"bitsandbytes": "nf4"}.get(quantization, quantization))
    if quantization is None and (base / "model.safetensors").is_file():
        before, after = _state(base), _state(output_dir)
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after), "the weights did not change"


def check_replayed(args: list[str], work: Path) -> None:
    output_dir = _output_dir(args, work)
    trajectory = work / _value(args, "--trajectory")
    source = trajectory.parent if trajectory.is_file() else trajectory
    steps = _value(args, "--steps")
    payload = json.loads((source / "zo_trajectory.json").read_text())
    if steps is None or int(steps) >= payload["global_step"]:
        replayed, trained = _state(output_dir), _state(source)  # A LoRA run's: both adapters.
        assert replayed, f"zo-replay saved no weights in {output_dir}"
        for key, value in replayed.items():
            assert torch.equal(value, trained[key]), key


def run_command(command: Command, work: Path, model: Path) -> None:
    args = shrunk(command, work, model)
    where = f"README.md line {command.line}: {command.program} {shlex.join(command.args)}"
    if command.program == "zo-bench" and args and args[0] in BENCH_SUITES_NOT_RUN:
        from benchmarks.zo_bench.cli import build_parser

        parsed = build_parser().parse_args(args)  # A wrong flag or suite fails here (SystemExit).
        if parsed.plan:
            json.loads(parsed.plan)
        return
    result = _run(command.program, args, work, command.env)
    assert result.returncode == 0, f"{where}\nexit status {result.returncode}\n{result.stderr[-6000:]}"
    if command.program in ("zo-train", "zo-run") and _value(args, "--do_train") != "false":
        if command.program == "zo-run" and "--do_train" not in args:
            return
        check_trained(_output_dir(args, work), model, args, work)
    elif command.program == "zo-replay":
        check_replayed(args, work)
    elif command.program == "zo-quantize":
        config = json.loads((_output_dir(args, work) / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "gptq", config.get("quantization_config")


COMMANDS = readme_commands()
# ~19 console-script runs and 3 python blocks of ~5-10 s each: 2-3 minutes on 2 cores. The commands run in README
# order in one scratch folder (a later one reads what an earlier one wrote): under -n, pyproject's --dist loadfile
# keeps them on one worker.
pytestmark = pytest.mark.slow


def test_the_readme_has_the_commands_this_test_knows_how_to_run():
    programs = {c.program for c in COMMANDS}
    assert {"zo-train", "zo-replay", "zo-quantize", "zo-bench"} <= programs, programs
    main_job = [c for c in COMMANDS if c.program == "zo-train" and c.args[:1] == ["configs/rte_sparse_mezo.yaml"]]
    assert main_job, "the README's main job (zo-train configs/rte_sparse_mezo.yaml) is not in a ```bash block"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command(command, scratch):
    if command.skip:
        pytest.skip(command.skip)
    work, model = scratch
    run_command(command, work, model)


CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.y*ml"))
IN_README = {c.args[0] for c in COMMANDS if c.program == "zo-train" and c.args and c.args[0].startswith("configs/")}


@pytest.mark.parametrize("config", CONFIGS)
def test_config_file(config, scratch, tmp_path):
    if f"configs/{config}" in IN_README:
        pytest.skip("run above, as the README's command")
    work, model = scratch
    own = tmp_path / "repo"  # Its own folder: a config's output_dir may repeat another's.
    own.mkdir()
    for name in ("configs", ".venv"):
        (own / name).symlink_to(REPO / name)
    (tmp_path / "shared").symlink_to(work.parent / "shared")
    run_command(Command(0, "zo-train", [f"configs/{config}"]), own, model)


# ----- the README's ```python blocks -----------------------------------------------------------------------------
FRAGMENT_MARK = re.compile(r"<!--\s*readme-test:\s*fragment\s*-->")
RTE_FROM_BLOCK = "../shared/data/superglue/rte"  # What the README's blocks name; resolves from each block's folder.
# (pattern, replacement): the only changes made to a block's text. {model} is the tiny test model folder.
PYTHON_SUBSTITUTIONS = [
    (r"load_model_and_tokenizer\(None\)", "load_model_and_tokenizer({model!r})"),
    (r"\bmax_steps=\d+", f"max_steps={STEPS}"),
    (r"\bnum_train=\d+", "num_train=8"),
    (r"\bnum_dev=\d+", "num_dev=4"),
    (r"\bnum_eval=\d+", "num_eval=8"),
]
# What a notebook holds before a fragment's lines run: the tiny model, its tokenizer, small RTE datasets, a collator.
FRAGMENT_PREAMBLE = f"""
from zo_trainer.data import CandidateCollator, load_task_splits, prepare_dataset
from zo_trainer.models import load_model_and_tokenizer
from zo_trainer.tasks import get_task

model, tokenizer = load_model_and_tokenizer(README_TEST_MODEL)
_splits = load_task_splits(get_task("rte"), {RTE_FROM_BLOCK!r}, num_train=8, num_dev=4, num_eval=8)
train, dev = (prepare_dataset(tokenizer, get_task("rte"), _splits[k], max_length=64) for k in ("train", "dev"))
collator = CandidateCollator(tokenizer)
del CandidateCollator, load_task_splits, prepare_dataset, load_model_and_tokenizer, get_task, _splits  # Only those 5.
"""
# Run after the block, in its namespace: the outcome checks; prints the list of what it checked.
POSTAMBLE = f"""
import json as _json, torch as _torch, transformers as _transformers
import zo_trainer.tasks as _tasks
_checked = []
_trainer = globals().get("trainer")
if isinstance(_trainer, _transformers.Trainer):
    assert _trainer.state.global_step == {STEPS}, f"trainer.state.global_step == {{_trainer.state.global_step}}"
    _checked.append("trainer.state.global_step == {STEPS}")
if README_TEST_TRAINS:
    _base = _transformers.AutoModelForCausalLM.from_pretrained(README_TEST_MODEL).state_dict()
    if hasattr(model, "peft_config"):  # A PEFT model: the base stays bit-identical, every lora_B left its zeros.
        _now = model.get_base_model().state_dict()
        _frozen = {{k: v for k, v in _now.items() if "lora_" not in k}}
        _names = {{k.replace("base_layer.", "") for k in _frozen}}
        assert _names == set(_base), "a PEFT model whose base has other tensors than the tiny base"
        assert all(_torch.equal(v, _base[k.replace("base_layer.", "")]) for k, v in _frozen.items()), "base changed"
        _lora_b = [v for k, v in _now.items() if "lora_B" in k]
        assert _lora_b and all(bool(v.any()) for v in _lora_b), "a lora_B tensor is still all zeros"
        _checked.append("base weights unchanged, every lora_B trained")
    else:
        _now = model.state_dict()
        assert any(not _torch.equal(_now[k], _base[k]) for k in _base if k in _now), "training left model unchanged"
        _checked.append("model weights differ from the tiny base")
_builtin = {{v.name for v in vars(_tasks).values() if isinstance(v, _tasks.Task)}}
for _name in sorted(set(_tasks.TASKS) - _builtin):  # Registered by the block: it must load and be evaluated.
    from zo_trainer import ZOTrainer as _ZOTrainer, ZOTrainingArguments as _ZOArgs
    from zo_trainer.data import CandidateCollator as _Collator, compute_accuracy as _accuracy
    from zo_trainer.data import load_task_splits as _splits_of, prepare_dataset as _prepare
    from zo_trainer.models import load_model_and_tokenizer as _load

    _task = _tasks.get_task(_name)
    _model, _tokenizer = _load(README_TEST_MODEL)
    _eval = _prepare(_tokenizer, _task, _splits_of(_task, {RTE_FROM_BLOCK!r}, 4, 4, 8)["eval"], max_length=64)
    _args = _ZOArgs(output_dir="task-check", optim="mezo", report_to="none", per_device_eval_batch_size=8)
    _metrics = _ZOTrainer(model=_model, args=_args, eval_dataset=_eval, processing_class=_tokenizer,
                          data_collator=_Collator(_tokenizer), compute_metrics=_accuracy).evaluate()
    assert 0 <= _metrics["eval_accuracy"] <= 1, _metrics
    _checked.append(f"registered task {{_name!r}} evaluated on RTE")
print("readme-test checked: " + _json.dumps(_checked))
"""
# Runs one block: its code compiled as README.md (tracebacks give README line numbers), in one __main__ namespace.
RUNNER = """
import json, sys
spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
namespace = {"__name__": "__main__", "README_TEST_MODEL": spec["model"], "README_TEST_TRAINS": spec["trains"]}
exec(compile(spec["preamble"], "<readme-test fragment preamble>", "exec"), namespace)
exec(compile("\\n" * (spec["line"] - 1) + spec["code"], "README.md", "exec"), namespace)
exec(compile(spec["postamble"], "<readme-test outcome checks>", "exec"), namespace)
"""
EXPECTED_PRINT = re.compile(r"print\(.*#\s*(\{.*\})\s*$")


@dataclass
class PythonBlock:
    line: int  # Of the README (1-based), the block's first line of code.
    code: str
    fragment: bool = False
    skip: str | None = None

    @property
    def id(self) -> str:
        first = next((ln for ln in self.code.splitlines() if ln.strip() and not ln.startswith("#")), "")
        return f"L{self.line}-python-" + "_".join(re.findall(r"\w+", first)[:3])


def _is_sketch(code: str) -> bool:
    """``...`` as code (an operator token), not in a comment or a string."""
    import io
    import tokenize

    try:
        return any(
            t.type == tokenize.OP and t.string == "..." for t in tokenize.generate_tokens(io.StringIO(code).readline)
        )
    except (tokenize.TokenError, SyntaxError):
        return False  # Let it run and fail with Python's own message.


def readme_python_blocks() -> list[PythonBlock]:
    found = []
    for line, code, previous in fenced_blocks(readme_text(), "python"):
        skip = _skip_reason(previous) or ("a sketch (its code contains ...)" if _is_sketch(code) else None)
        found.append(PythonBlock(line, code, bool(FRAGMENT_MARK.search(previous)), skip))
    return found


def shrunk_code(code: str, model: Path) -> str:
    for pattern, replacement in PYTHON_SUBSTITUTIONS:
        code = re.sub(pattern, lambda _m, r=replacement: r.format(model=str(model)), code)
    return code


def run_python_block(block: PythonBlock, folder: Path, model: Path) -> subprocess.CompletedProcess:
    code = shrunk_code(block.code, model)
    spec = {
        "model": str(model),
        "trains": ".train()" in code,
        "line": block.line,
        "code": code,
        "preamble": FRAGMENT_PREAMBLE if block.fragment else "",
        "postamble": POSTAMBLE,
    }
    (folder / "readme_block.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "readme_runner.py").write_text(RUNNER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "readme_runner.py", "readme_block.json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_python_block(block: PythonBlock, result: subprocess.CompletedProcess) -> list[str]:
    """The outcome checks (exit status, what the postamble checked, documented printed keys); what was checked."""
    where = f"README.md line {block.line}: ```python block" + (" (a fragment)" if block.fragment else "")
    assert result.returncode == 0, f"{where}\nexit status {result.returncode}\n{result.stderr[-6000:]}"
    marker = re.search(r"^readme-test checked: (.*)$", result.stdout, re.MULTILINE)
    assert marker, f"{where}: the outcome checks did not run\n{result.stdout[-3000:]}"
    checked = json.loads(marker.group(1))
    for line in block.code.splitlines():
        expected = EXPECTED_PRINT.search(line)
        if expected:  # The comment shows what the print gives: those keys, with numbers, must be printed.
            for key in re.findall(r"['\"](\w+)['\"]\s*:", expected.group(1)):
                assert re.search(rf"['\"]{key}['\"]\s*:\s*-?[\d.]", result.stdout), f"{where}: no {key!r} printed"
                checked.append(f"printed {key}")
    return checked


PYTHON_BLOCKS = readme_python_blocks()


def test_the_readme_has_the_python_blocks_this_test_knows_how_to_run():
    runnable = [b for b in PYTHON_BLOCKS if not b.skip]
    assert any("trainer.evaluate(" in b.code for b in runnable), "the notebook example is not run"
    assert any("zo_trainer.enable()" in b.code and b.fragment for b in runnable), "the enable() fragment is not run"
    assert any("register_task(" in b.code for b in runnable), "the register_task example is not run"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_readme_python_block(block, scratch, tmp_path):
    if block.skip:
        pytest.skip(block.skip)
    work, model = scratch
    folder = tmp_path / "notebook"  # Its own folder: blocks write "out".
    folder.mkdir()
    (tmp_path / "shared").symlink_to(work.parent / "shared")
    checked = check_python_block(block, run_python_block(block, folder, model))
    assert checked, f"README.md line {block.line}: the block ran but no outcome of it was checked"
    print(f"README.md line {block.line}: checked {checked}")  # Shown by pytest -rP.

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


def bash_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(first line number, body, skip reason) of every ```bash block."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            previous = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
            mark = SKIP_MARK.search(previous)
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            blocks.append((index + 2, "\n".join(lines[index + 1 : end]), mark.group(1) if mark else None))
            index = end
        index += 1
    return blocks


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


def readme_commands() -> list[Command]:
    text = Path(os.environ.get("ZO_TEST_README", REPO / "README.md")).read_text(encoding="utf-8")  # Env: check a draft.
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


def _state(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def check_trained(output_dir: Path, model: Path, args: list[str], work: Path) -> None:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS, state["global_step"]
    config = json.loads((output_dir / "config.json").read_text())
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    if quantization is None:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(output_dir)
    else:
        from zo_trainer.quant import load_quantized

        load_quantized(str(output_dir), {"bitsandbytes": "nf4"}.get(quantization, quantization))
    named = _value(args, "--model_name_or_path")
    base = Path(named) if named and Path(named).is_absolute() else work / (named or "")
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
        replayed, trained = _state(output_dir), _state(source)
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
pytestmark = pytest.mark.slow  # ~16 console-script runs of ~5 s each: about 1.5-2 minutes on 2 shared cores.


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

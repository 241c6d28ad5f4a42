"""Declarative task definitions: classification cast as language modelling (MeZO protocol).

Each task turns an example into a prompt and a list of answer strings ("candidates"); the
predicted class is the candidate with the highest mean log-probability after the prompt.
Prompts follow the MeZO templates (Malladi et al., 2023) for the SuperGLUE tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Task", "TASKS", "get_task", "register_task"]


@dataclass(frozen=True)
class Task:
    """A prompt-based classification task.

    ``template`` is formatted with ``str.format(**example)`` unless ``prompt_fn`` is given;
    ``candidates[i]`` is the answer string of class ``i`` unless ``candidates_fn`` is given
    (tasks such as COPA whose answers depend on the example).
    """

    name: str
    hub_path: str
    hub_config: str
    template: str
    candidates: tuple[str, ...]
    label_map: Mapping[Any, int] = field(hash=False)
    fields: tuple[str, ...]
    eval_split: str = "validation"
    candidates_fn: Callable[[dict], tuple[str, ...]] | None = field(default=None, compare=False)
    prompt_fn: Callable[[dict], str] | None = field(default=None, compare=False)

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The prompt text for ``example`` (everything before the answer)."""
        if self.prompt_fn is not None:
            return self.prompt_fn(dict(example))
        return self.template.format(**example)

    def get_candidates(self, example: Mapping[str, Any]) -> tuple[str, ...]:
        """The answer strings for ``example``; index = class id."""
        if self.candidates_fn is not None:
            return tuple(self.candidates_fn(dict(example)))
        return self.candidates

    def label_id(self, raw_label: Any) -> int:
        """Map a raw label (as stored in jsonl or on the Hub) to a class id."""
        try:
            return self.label_map[raw_label]
        except (KeyError, TypeError):
            raise ValueError(
                f"task {self.name!r}: label {raw_label!r} is not one of the allowed labels {list(self.label_map)}"
            ) from None


# --- COPA: answers are the example's two choices, continuing "premise because/so" ----------


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _copa_prompt(example: dict) -> str:
    premise = example["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    connector = " because" if example["question"] == "cause" else " so"
    return premise + connector


def _copa_candidates(example: dict) -> tuple[str, ...]:
    # Leading space: the answer continues the sentence started by the prompt.
    return (" " + _lower_first(example["choice1"]), " " + _lower_first(example["choice2"]))


def _boolq_prompt(example: dict) -> str:
    question = example["question"].strip().rstrip("?")
    return f"{example['passage']} {question[:1].upper() + question[1:]}?\n"


RTE = Task(
    name="rte",
    hub_path="aps/super_glue",
    hub_config="rte",
    template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
    candidates=("Yes", "No"),
    label_map={"entailment": 0, "not_entailment": 1, 0: 0, 1: 1},
    fields=("premise", "hypothesis"),
)

CB = Task(
    name="cb",
    hub_path="aps/super_glue",
    hub_config="cb",
    template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
    candidates=("Yes", "No", "Maybe"),
    label_map={"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2},
    fields=("premise", "hypothesis"),
)

# BoolQ/WiC labels are JSON booleans in SuperGLUE jsonl and 0/1 on the Hub; since
# False == 0 and True == 1 in Python, one key per class covers both.
BOOLQ = Task(
    name="boolq",
    hub_path="aps/super_glue",
    hub_config="boolq",
    template="{passage} {question}?\n",  # prompt_fn also capitalises the question
    candidates=("No", "Yes"),
    label_map={False: 0, True: 1},
    fields=("passage", "question"),
    prompt_fn=_boolq_prompt,
)

WIC = Task(
    name="wic",
    hub_path="aps/super_glue",
    hub_config="wic",
    template=(
        'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n'
    ),
    candidates=("No", "Yes"),
    label_map={False: 0, True: 1},
    fields=("word", "sentence1", "sentence2"),
)

COPA = Task(
    name="copa",
    hub_path="aps/super_glue",
    hub_config="copa",
    template="{premise} ({question})",  # informative only; prompt_fn builds the real prompt
    candidates=("choice1", "choice2"),  # placeholders; candidates_fn gives the real answers
    label_map={0: 0, 1: 1},
    fields=("premise", "choice1", "choice2", "question"),
    candidates_fn=_copa_candidates,
    prompt_fn=_copa_prompt,
)

TASKS: dict[str, Task] = {t.name: t for t in (RTE, BOOLQ, CB, WIC, COPA)}


def get_task(name: str) -> Task:
    """Look up a task by (case-insensitive) name; ``ValueError`` lists the known names."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add a task to ``TASKS`` (e.g. a custom prompt); refuses to replace one unless asked."""
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered; pass overwrite=True")
    TASKS[task.name] = task
    return task

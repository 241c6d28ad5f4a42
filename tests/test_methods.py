"""Methods own their settings (MethodConfig) and are added with register_method, as tasks with register_task."""

from __future__ import annotations

import pytest

from zo_trainer import ZOTrainingArguments
from zo_trainer.cli.errors import UsageError
from zo_trainer.cli.train import parse_args
from zo_trainer.methods import QZO, ZO_METHODS, MethodConfig, MeZO, SparseMeZO, register_method
from zo_trainer.methods.qzo import QZOConfig
from zo_trainer.trajectory import build_method


class _CountingMeZO(MeZO):
    name = "test_counting_mezo"


@pytest.fixture
def registered():
    register_method(_CountingMeZO)
    yield _CountingMeZO
    ZO_METHODS.pop(_CountingMeZO.name, None)


def test_a_registered_method_is_an_optim_choice_of_the_cli_and_the_arguments(registered, tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_method(registered)
    _, _, args = parse_args(["--optim", registered.name, "--output_dir", str(tmp_path)])
    assert args.optim == registered.name and args.is_zo
    assert ZOTrainingArguments(output_dir=str(tmp_path), optim=registered.name, report_to="none").is_zo


def test_an_unregistered_method_is_refused_by_the_cli(tmp_path):
    with pytest.raises(UsageError, match="invalid choice: 'test_counting_mezo'"):
        parse_args(["--optim", "test_counting_mezo", "--output_dir", str(tmp_path)])


def test_each_method_reads_its_own_config_built_in_one_place(tmp_path):
    args = ZOTrainingArguments(
        output_dir=str(tmp_path),
        optim="qzo",
        report_to="none",
        zo_clip=5.0,
        zo_train_unquantized=True,
        weight_decay=0.1,
    )
    config = QZO.config_class.from_training_args(args)
    assert config == QZOConfig(sparsity=None, clip=5.0, weight_decay=0.1, train_unquantized=True)
    assert QZO(args).config == config and QZO(config).clip_value == 5.0
    assert type(MeZO(args).config) is MethodConfig and not hasattr(MeZO(args).config, "train_unquantized")
    assert SparseMeZO(MethodConfig()).sparsity == SparseMeZO.default_sparsity


def test_replay_builds_the_method_from_the_trajectory_without_training_arguments():
    config = QZOConfig(sparsity=0.5, clip=float("inf"), weight_decay=0.0, train_unquantized=True)
    payload = {"method": "qzo", "sparsity": 0.5, "method_args": {**config.to_training_args(), "zo_clip": "inf"}}
    method = build_method(payload)
    assert isinstance(method, QZO) and method.config == config and method.sparsity == 0.5
    # A trajectory that recorded only the sparsity (older files) still gives the method its defaults.
    assert build_method({"method": "sparse_mezo", "sparsity": 0.7}).config == MethodConfig(sparsity=0.7)

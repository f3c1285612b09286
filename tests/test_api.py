"""The documented Python API: `from hypo import HyPOConfig, train` keeps working after any import."""

import importlib
import inspect
import pkgutil

from test_train import FAST

import hypo
from hypo import HyPOConfig, train


def test_train_stays_the_function_after_every_submodule_is_imported():
    for module in pkgutil.walk_packages(hypo.__path__, "hypo."):
        importlib.import_module(module.name)
    assert inspect.isfunction(hypo.train) and hypo.train is train


def test_train_runs_twice(tiny_model_dir, tiny_task, tmp_path):
    common = {"model_name_or_path": str(tiny_model_dir), "dataset": str(tiny_task["pairs"]), "method": "dpo",
              "max_steps": 1, "eval_at_end": False, **FAST}
    first = hypo.train(HyPOConfig(output_dir=str(tmp_path / "one"), **common))
    second = hypo.train(HyPOConfig(output_dir=str(tmp_path / "two"), **common))
    assert first.steps == second.steps == 1 and (second.model_dir / "config.json").is_file()


def test_runs_with_other_precisions_follow_each_other_in_one_process(tiny_model_dir, tiny_task, tmp_path):
    common = {"model_name_or_path": str(tiny_model_dir), "dataset": str(tiny_task["pairs"]), "method": "dpo",
              "max_steps": 1, "eval_at_end": False, **FAST}
    for name, precision in (("fp32", "no"), ("bf16", "bf16"), ("again", "no")):
        result = hypo.train(HyPOConfig(output_dir=str(tmp_path / name), mixed_precision=precision, **common))
        assert result.steps == 1

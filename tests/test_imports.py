"""Every module imports; the math modules import torch and nothing heavier."""

import importlib
import pkgutil
import subprocess
import sys

import hypo


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(hypo.__path__, "hypo.")]
    assert {"hypo.objective.losses", "hypo.objective.logprobs", "hypo.training.trainer", "hypo.cli",
            "hypo.data.rows", "hypo.evaluation.held_out"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_core_math_imports_only_torch():
    code = ("import sys, hypo.objective.losses, hypo.objective.logprobs, hypo.sampling.generate; "
            "print(','.join(m for m in ('transformers', 'accelerate', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""

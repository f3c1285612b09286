"""DeepSpeed ZeRO-3 for real, on 2 CPU processes (DeepSpeed's CPU accelerator over gloo), with the recipe's
DeepSpeed config (recipes/accelerate/zero3.json): the policy partitioned by the training engine, the reference by
an engine without optimizer, generation on gathered weights without DeepSpeed's hooks, gradient accumulation,
checkpoints saved through accelerate's `get_state_dict`, a resumed run, and the evaluations. The weights and the
evaluation must match one unsharded process that takes the same batches (2 processes x 2 micro-steps == 1 process
x 4 micro-steps). Skipped without DeepSpeed (an optional extra: pip install hypo[deepspeed])."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import FAST, _weights

from conftest import free_port
from hypo.config import HyPOConfig
from hypo.training.trainer import train

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install hypo[deepspeed])")

RECIPE = Path(__file__).parents[1] / "recipes" / "accelerate" / "zero3.json"
TIMEOUT_S = int(os.environ.get("HYPO_TEST_TIMEOUT_S", "900"))  # the first DeepSpeed run on a machine also
# compiles DeepSpeed's CPU communication op (minutes); later runs take about 30-60 s each on 2 cores


def _launch(tmp_path: Path, options: dict) -> subprocess.CompletedProcess:
    settings = tmp_path / "zero3.yaml"
    settings.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                        f"  deepspeed_config_file: {RECIPE}\n  zero3_init_flag: true\nnum_machines: 1\n"
                        "num_processes: 2\nmachine_rank: 0\nuse_cpu: false\n")
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(settings),
               "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1", "-m", "hypo.cli",
               "train"]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _options(tiny_model_dir, tiny_task, output_dir: Path, **overrides) -> dict:
    return {"model_name_or_path": str(tiny_model_dir), "dataset": str(tiny_task["pairs"]),
            "prompts": str(tiny_task["prompts"]), "eval_prompts": str(tiny_task["eval_prompts"]),
            "judge": "review-sentiment", "eval_dataset": str(tiny_task["pairs"]), "eval_dataset_split": "train",
            "eval_max_pairs": 4, "num_threads": 1, "output_dir": str(output_dir), **FAST, **overrides}


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero3_on_two_cpu_processes_trains_saves_resumes_and_evaluates_like_one_process(tiny_model_dir, tiny_task,
                                                                                         tmp_path):
    dpo = {"method": "dpo", "max_steps": 4, "save_steps": 2}
    whole = tmp_path / "zero3"
    done = _launch(tmp_path, _options(tiny_model_dir, tiny_task, whole, gradient_accumulation_steps=2, **dpo))
    assert done.stdout.count("hypo train (method dpo)") == 1  # one main process, not two of rank 0
    single = train(HyPOConfig(**_options(tiny_model_dir, tiny_task, tmp_path / "single", gradient_accumulation_steps=4,
                                         **dpo)))
    a, b, initial = _weights(whole / "model"), _weights(single.model_dir), _weights(tiny_model_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights
    sharded_log, single_log = _records(whole), _records(single.output_dir)
    assert [r["step"] for r in sharded_log if "loss" in r] == [1, 2, 3, 4]
    for x, y in zip([r for r in sharded_log if "loss" in r], [r for r in single_log if "loss" in r], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                  rel=1e-4)
    # the evaluations: the held-out pairs (each process scores half) and the prompts (the main process alone)
    eval_a, eval_b = ({k: v for r in log for k, v in r.items() if k.startswith("eval_")} for log in (sharded_log,
                                                                                              single_log))
    for key in ("eval_loss", "eval_rewards/margins", "eval_objective/kl", "eval_win_rate"):
        assert eval_a[key] == pytest.approx(eval_b[key], abs=1e-4), key
    assert (whole / "checkpoint-2" / "training_state" / "pytorch_model").is_dir()  # the engine's own state

    # resumed from checkpoint-2: the same final weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(whole / name, resumed / name)
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    _launch(tmp_path, _options(tiny_model_dir, tiny_task, resumed, gradient_accumulation_steps=2,
                               resume_from_checkpoint=str(resumed / "checkpoint-2"), **dpo))
    c = _weights(resumed / "model")
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert [r["step"] for r in _records(resumed) if "loss" in r] == [1, 2, 3, 4]

    # HyPO: samples of the current policy, generated on gathered weights without DeepSpeed's hooks
    hypo_dir = tmp_path / "hypo"
    options = _options(tiny_model_dir, tiny_task, hypo_dir, method="hypo", max_steps=2, gradient_accumulation_steps=2)
    del options["eval_dataset"], options["eval_dataset_split"], options["eval_max_pairs"]
    _launch(tmp_path, options)
    steps = [r for r in _records(hypo_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["objective/kl"] is not None for r in steps)
    assert steps[-1]["completions/mean_length"] > 0 and (hypo_dir / "model" / "model.safetensors").is_file()

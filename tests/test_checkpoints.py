"""Checkpoints and resuming: a run killed (SIGKILL) or stopped (SIGTERM) after a checkpoint and resumed
ends with the same weights as the uninterrupted run; interrupted saves leave nothing half-written;
a run folder is never mixed with another run; checkpoints rotate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import FAST, _weights

from conftest import free_port
from hypo.config import HyPOConfig
from hypo.training.trainer import train

SLOW_ENOUGH = {"max_steps": 24, "save_steps": 2, "num_threads": 1, "eval_at_end": False}


def _options(tiny_model_dir, tiny_task, output_dir, method, **overrides) -> dict:
    return {"model_name_or_path": str(tiny_model_dir), "dataset": str(tiny_task["pairs"]),
            "prompts": str(tiny_task["prompts"]), "judge": "review-sentiment", "method": method,
            "output_dir": str(output_dir), **FAST, **SLOW_ENOUGH, **overrides}


def _command(options: dict, processes: int = 1) -> list[str]:
    args = [sys.executable, "-m", "hypo.cli", "train"]
    if processes > 1:
        args = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), "-m", "hypo.cli", "train"]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return args


def _start_and_signal(options: dict, number: int, when, processes: int = 1) -> subprocess.CompletedProcess:
    """Start `hypo train` (its own process group), send `number` to the group as soon as `when()` holds,
    wait for its end."""
    process = subprocess.Popen(_command(options, processes), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not when() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is not None:
        raise AssertionError(f"the run ended before the signal (exit {process.returncode}): make it longer, or see "
                             f"its stderr:\n{process.stderr.read()[-3000:]}")
    if processes > 1:  # the launcher's workers may run in sessions of their own: signal each of them
        import psutil

        for child in psutil.Process(process.pid).children(recursive=True):
            child.send_signal(number)
    os.killpg(process.pid, number)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _run(options: dict, processes: int) -> None:
    done = subprocess.run(_command(options, processes), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _train_records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("method", ["dpo", "hypo"])
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, tiny_task, tmp_path, method):
    whole = train(HyPOConfig(**_options(tiny_model_dir, tiny_task, tmp_path / "whole", method)))
    killed_dir = tmp_path / "killed"
    options = _options(tiny_model_dir, tiny_task, killed_dir, method)
    done = _start_and_signal(options, signal.SIGKILL, lambda: (killed_dir / "checkpoint-2").is_dir())
    assert done.returncode == -signal.SIGKILL
    assert not (killed_dir / "model").exists()
    resumed = train(HyPOConfig(**{**options, "resume_from_checkpoint": "latest"}))
    _assert_identical(whole.model_dir, resumed.model_dir)
    # metrics.jsonl continues: each step once, the same numbers as the uninterrupted run
    records, expected = _train_records(killed_dir), _train_records(whole.output_dir)
    assert [r["step"] for r in records] == list(range(1, 25))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]


@pytest.mark.parametrize(("number", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_a_checkpoint_and_exits(tiny_model_dir, tiny_task, tmp_path, number, exit_code):
    whole = train(HyPOConfig(**_options(tiny_model_dir, tiny_task, tmp_path / "whole", "hypo", save_steps=0)))
    run_dir = tmp_path / "stopped"
    options = _options(tiny_model_dir, tiny_task, run_dir, "hypo", save_steps=0)
    metrics = run_dir / "metrics.jsonl"
    done = _start_and_signal(options, number, lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1)
    assert done.returncode == exit_code, done.stderr[-2000:]
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and "resume with: hypo train --resume_from_checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    resumed = train(HyPOConfig(**{**options, "resume_from_checkpoint": str(checkpoints[0])}))
    _assert_identical(whole.model_dir, resumed.model_dir)


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(tiny_model_dir, tiny_task, tmp_path):
    from hypo.training.checkpoints import list_checkpoints, resolve_checkpoint

    run_dir = tmp_path / "run"
    train(HyPOConfig(**_options(tiny_model_dir, tiny_task, run_dir, "dpo", max_steps=5)))
    (run_dir / "checkpoint-6.partial").mkdir()  # what a kill while saving step 6 leaves
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert resolve_checkpoint("latest", run_dir).name == "checkpoint-4"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(run_dir / "checkpoint-6.partial"), run_dir)


def test_save_total_limit_keeps_the_newest(tiny_model_dir, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    train(HyPOConfig(**_options(tiny_model_dir, tiny_task, run_dir, "dpo", max_steps=5, save_steps=1,
                                save_total_limit=2)))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_a_folder_holding_a_run_is_refused_or_moved_aside(tiny_model_dir, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    options = _options(tiny_model_dir, tiny_task, run_dir, "dpo", max_steps=1, save_steps=0)
    train(HyPOConfig(**options))
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        train(HyPOConfig(**{**options, "beta": 0.5}))
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert json.loads((run_dir / "config.json").read_text())["beta"] == 0.1  # not rewritten by the refused run
    train(HyPOConfig(**{**options, "beta": 0.5, "overwrite_output_dir": True}))
    (previous,) = tmp_path.glob("run.previous-*")
    assert (previous / "metrics.jsonl").read_text() == before and (previous / "model" / "config.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["beta"] == 0.5


def test_resuming_with_other_settings_is_refused(tiny_model_dir, tiny_task, tmp_path):
    run_dir = tmp_path / "run"
    options = _options(tiny_model_dir, tiny_task, run_dir, "dpo", max_steps=3)
    train(HyPOConfig(**options))
    with pytest.raises(ValueError, match="learning_rate"):
        train(HyPOConfig(**{**options, "learning_rate": 0.5, "resume_from_checkpoint": "latest"}))


def test_resume_on_the_command_line_reads_the_runs_settings(tiny_model_dir, tiny_task, tmp_path):
    from hypo.cli.train import parse_train_args

    run_dir = tmp_path / "run"
    train(HyPOConfig(**_options(tiny_model_dir, tiny_task, run_dir, "dpo", max_steps=3, beta=0.3)))
    config = parse_train_args(["--resume_from_checkpoint", str(run_dir / "checkpoint-2")])
    assert config.beta == 0.3 and config.output_dir == str(run_dir) and config.max_steps == 3


def test_non_finite_loss_stops_before_the_optimizer_steps(tiny_model_dir, tiny_task, tmp_path):
    from hypo.training.stopping import NonFiniteError

    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step \d+: the offline \(dpo\) loss is not finite.*checkpoint-1"):
        train(HyPOConfig(**_options(tiny_model_dir, tiny_task, run_dir, "dpo", learning_rate=1e12, max_grad_norm=0.0,
                                    max_steps=20, save_steps=1, warmup_ratio=0.0)))
    assert not (run_dir / "model").exists()

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    records = [json.loads(line, parse_constant=strict) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] is None  # the failing step is logged, its non-finite numbers as null
    last_good = records[-2]["step"]
    assert (run_dir / f"checkpoint-{last_good}").is_dir()
    weights = _weights(run_dir / f"checkpoint-{last_good}")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "hypo"])
def test_killed_two_process_run_resumes_to_the_same_weights(tiny_model_dir, tiny_task, tmp_path, method):
    """Under `accelerate launch` with 2 CPU processes (gloo): every process's random state is restored."""
    longer = {"max_steps": 80}  # two processes step faster: room to kill the run before its end
    whole = _options(tiny_model_dir, tiny_task, tmp_path / "whole", method, **longer)
    _run(whole, processes=2)
    killed_dir = tmp_path / "killed"
    options = _options(tiny_model_dir, tiny_task, killed_dir, method, **longer)
    done = _start_and_signal(options, signal.SIGKILL, lambda: (killed_dir / "checkpoint-2").is_dir(), processes=2)
    assert done.returncode == -signal.SIGKILL and not (killed_dir / "model").exists()
    _run({**options, "resume_from_checkpoint": "latest"}, processes=2)
    _assert_identical(tmp_path / "whole" / "model", killed_dir / "model")
    assert [r["step"] for r in _train_records(killed_dir)] == list(range(1, 81))


def test_a_lora_model_is_saved_merged_on_the_cpu_without_a_copy_of_the_model(tiny_tokenizer, tmp_path, monkeypatch):
    """The merged model is built weight by weight on the CPU in float32 (no deep copy of the model, which took as
    much memory again on its device), gives the LoRA policy's logits, and a bf16 base is saved in float32 (the
    merged delta is not rounded to bf16)."""
    import copy

    from transformers import AutoModelForCausalLM

    from conftest import build_model
    from hypo.models.loading import add_lora
    from hypo.training.checkpoints import save_pretrained

    real_deepcopy = copy.deepcopy

    def no_model_copies(value, *args, **kwargs):  # configs may be copied, models may not
        if isinstance(value, torch.nn.Module):
            pytest.fail("the model was deep-copied to be saved")
        return real_deepcopy(value, *args, **kwargs)

    for dtype in (torch.float32, torch.bfloat16):
        policy = add_lora(build_model(tiny_tokenizer, seed=1).to(dtype), r=4, alpha=8, dropout=0.0,
                          target_modules="all-linear")
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        expected = copy.deepcopy(policy).float().merge_and_unload()
        with monkeypatch.context() as patch:
            patch.setattr(copy, "deepcopy", no_model_copies)
            save_pretrained(policy, tiny_tokenizer, tmp_path / str(dtype))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / str(dtype), dtype="auto")
        assert saved.dtype == torch.float32 and (tmp_path / str(dtype) / "adapter").is_dir()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            torch.testing.assert_close(saved(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-5,
                                       atol=1e-5)
        assert {p.dtype for n, p in policy.named_parameters() if "lora" not in n} == {dtype}  # untouched

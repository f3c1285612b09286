"""The metrics logger writes one JSON line per call on the main process; the timer sums phases."""

import json
import time
from types import SimpleNamespace

import torch

from hypo.training.tracking import RunLogger, StepTimer


def test_run_logger_writes_jsonl_with_plain_numbers(tmp_path):
    logger = RunLogger(tmp_path, SimpleNamespace(is_main_process=True), report_to=[], config={})
    logger.log({"loss": torch.tensor(0.5), "rewards/margins": 1.25}, step=3)
    logger.log({"loss": 0.25}, step=4)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "loss": 0.5, "rewards/margins": 1.25}, {"step": 4, "loss": 0.25}]


def test_run_logger_starts_a_fresh_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 99}\n')
    RunLogger(tmp_path, SimpleNamespace(is_main_process=True), report_to=[], config={}).log({"loss": 1.0}, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_run_logger_is_silent_on_other_processes(tmp_path):
    RunLogger(tmp_path, SimpleNamespace(is_main_process=False), report_to=[], config={}).log({"loss": 1.0}, 1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_step_timer_accumulates_named_phases():
    timer = StepTimer()
    for _ in range(2):
        with timer("generation"):
            time.sleep(0.01)
    assert set(timer.seconds) == {"generation"} and timer.seconds["generation"] >= 0.02


def test_step_timer_waits_for_the_device_at_every_clock_read():
    """CUDA kernels run asynchronously: a phase is charged with its GPU work only when each clock read first
    waits for the device. A stand-in device whose queued work takes 0.05 s after the phase's Python returns."""
    queued = []

    def synchronize():  # the device finishes what was queued
        while queued:
            time.sleep(queued.pop())

    timer = StepTimer(synchronize=synchronize)
    start = timer.now()
    with timer("generation"):
        queued.append(0.05)  # the kernels were launched; the launch itself returned at once
    with timer("reference"):
        pass
    assert timer.seconds["generation"] >= 0.05 and timer.seconds["reference"] < 0.05
    assert timer.now() - start >= 0.05


def test_step_timer_synchronizes_cuda_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    timer = StepTimer()
    with timer("generation"):
        pass
    timer.now()
    assert calls == ["sync"] * 3  # at the phase's start and end, and at the step's clock read

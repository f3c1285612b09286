"""Every run closes what it opened, on success and on error: the vLLM sampler and the trackers when `train`
returns or raises, the process groups (device meshes' included) before `hypo train` exits or, for a Python user
who may train again in the same process, at the interpreter's exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import _config, _EngineStandIn, _weights

import hypo.sampling.vllm
from conftest import free_port
from hypo.training.trainer import train

PYTHONPATH = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1] / "src"),
                             os.environ.get("PYTHONPATH", "")])


class _FailingEngine(_EngineStandIn):
    """Samples once, then fails (a server that went away)."""

    def generate(self, *args, **kwargs):
        if self.generated_with:
            raise ConnectionError("the vLLM server went away")
        return super().generate(*args, **kwargs)


def test_a_run_that_fails_closes_the_vllm_sampler_and_finishes_the_trackers(tiny_model_dir, tiny_task, tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("tensorboard")
    engine = _FailingEngine(tiny_model_dir)
    monkeypatch.setattr(hypo.sampling.vllm, "make_vllm_sampler", lambda config, path: engine)
    finished = []
    from accelerate.tracking import TensorBoardTracker

    monkeypatch.setattr(TensorBoardTracker, "finish", lambda self: finished.append(self.name))
    with pytest.raises(ConnectionError, match="went away"):
        train(_config(tiny_model_dir, tiny_task, tmp_path, "fails", method="hypo", max_steps=3, use_vllm=True,
                      vllm_mode="server", eval_at_end=False, report_to="tensorboard"))
    assert engine.closed and finished == ["tensorboard"]


def test_finishing_the_trackers_keeps_the_process_group(tmp_path):
    """`accelerator.end_training()` would also destroy the process group that a later run in the process reuses."""
    from types import SimpleNamespace

    from hypo.training.tracking import RunLogger

    finished = []
    accelerator = SimpleNamespace(is_main_process=True, init_trackers=lambda *a, **k: None,
                                  trackers=[SimpleNamespace(finish=lambda: finished.append(1))],
                                  end_training=lambda: pytest.fail("end_training destroys the process group"))
    logger = RunLogger(tmp_path, accelerator, report_to=["tensorboard"], config={})
    logger.close()
    logger.close()  # a second close does nothing
    assert finished == [1] and accelerator.trackers == []


CLOSE = textwrap.dedent("""
    import sys

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hypo.runtime.accelerator import close_process_groups, make_accelerator

    accelerator = make_accelerator(mixed_precision="no", trackers=[], project_dir=sys.argv[1])
    mesh = init_device_mesh("cpu", (1,))  # a device mesh's own group beside the default one
    assert dist.is_initialized() and accelerator.num_processes == 1
    close_process_groups()
    assert not dist.is_initialized()
    again = make_accelerator(mixed_precision="no", trackers=[], project_dir=sys.argv[1])  # a later run starts afresh
    assert again.process_index == 0
    print("closed")
""")


def test_close_process_groups_destroys_every_group_and_a_later_accelerator_starts_afresh(tmp_path):
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", CLOSE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr[-3000:]


TWICE = textwrap.dedent("""
    import json
    import sys

    import torch.distributed as dist

    from hypo.config import HyPOConfig
    from hypo.training.trainer import train

    options = json.loads(sys.argv[1])
    results = [train(HyPOConfig(**{**options, "output_dir": f"{options['output_dir']}/{i}"})) for i in range(2)]
    if results[0].is_main_process:
        print(json.dumps({"initialized": dist.is_initialized(), "dirs": [str(r.model_dir) for r in results]}))
""")


@pytest.mark.slow
def test_two_runs_in_one_process_under_torchrun_exit_cleanly(tiny_model_dir, tiny_task, tmp_path):
    """A Python user trains twice in one process under torchrun (with a tracker: finishing it must not destroy
    the group the second run reuses); the process groups close at the interpreter's exit, which ends with 0."""
    pytest.importorskip("tensorboard")
    config = _config(tiny_model_dir, tiny_task, tmp_path, "twice", method="hypo", max_steps=2, eval_at_end=False,
                     report_to="tensorboard", num_threads=1)
    script = tmp_path / "twice.py"
    script.write_text(TWICE)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
                           json.dumps(config.to_dict())], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["initialized"]  # kept between the runs
    first, second = (_weights(Path(d)) for d in report["dirs"])
    for key in first:
        assert torch.equal(first[key], second[key]), key  # the same run twice: the same weights

"""HyPOTrainer, TRL's DPOTrainer shape: objects in memory train exactly as the same files and paths do (one loop),
bad in-memory rows are reported by dataset and row before any model loads, callbacks see transformers' events and
can stop the run, a resumed run with a model object reaches the same weights, and evaluate / save_model /
push_to_hub do what TRL users expect."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from test_train import _assert_same_weights, _config, _weights
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import free_port
from hypo import HyPOTrainer
from hypo.data.files import DataError
from hypo.models.loading import load_tokenizer
from hypo.training.trainer import train


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _objects(tiny_model_dir, tiny_task, config):
    """The config's model and data as objects: a loaded model and tokenizer, Datasets and a list of dicts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = {"train_dataset": datasets.Dataset.from_list(_rows(tiny_task["pairs"])),
            "prompt_dataset": datasets.Dataset.from_list(_rows(tiny_task["prompts"])),
            "eval_prompts": _rows(tiny_task["eval_prompts"])}
    args = {**config.to_dict(), "model_name_or_path": "embedded:smollm2-135m-instruct", "dataset": None,
            "prompts": None, "eval_prompts": None}
    return model, load_tokenizer(str(tiny_model_dir)), type(config)(**args), data


class Recorder(TrainerCallback):
    """Records every event with the step it saw; stops (and asks for a checkpoint) after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None):
        self.events, self.stop_after, self.logs, self.evaluations = [], stop_after, [], []

    def on_init_end(self, args, state, control, **kwargs):
        self.events.append(("init_end", state.global_step))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        assert model is not None and optimizer is not None
        self.events.append(("train_begin", state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step))
        if state.global_step == self.stop_after:
            control.should_save = control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, dict(metrics)))

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.global_step))


def test_objects_in_memory_train_exactly_as_files_and_paths(tiny_model_dir, tiny_task, tmp_path):
    """A loaded model and reference, a tokenizer, Datasets and a list of dicts give, bit for bit, the weights and
    metrics of `hypo.train` on the same files and model folder (one loop), HyPO's sampling included."""
    config = _config(tiny_model_dir, tiny_task, tmp_path, "paths", max_steps=2, eval_at_end=False)
    from_paths = train(config)
    model, tokenizer, args, data = _objects(tiny_model_dir, tiny_task, config)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = HyPOTrainer(model=model, ref_model=reference, processing_class=tokenizer, **data,
                          args=args.__class__(**{**args.to_dict(), "output_dir": str(tmp_path / "obj")}))
    result = trainer.train()
    assert result.steps == 2 and trainer.model is model and trainer.ref_model is reference
    wa, wb = _weights(from_paths.model_dir), _weights(result.model_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    records = [[r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
               for d in (from_paths.output_dir, result.output_dir)]
    drop_times = [[{k: v for k, v in r.items() if "time" not in k and "throughput" not in k} for r in rs]
                  for rs in records]
    assert drop_times[0] == drop_times[1] and len(drop_times[0]) == 2
    saved = json.loads((result.output_dir / "in_memory_data.json").read_text())
    assert saved["train_dataset"]["rows"] == 8 and saved["prompt_dataset"]["rows"] == 8
    card = (result.model_dir / "README.md").read_text()
    assert "`train_dataset`, 8 rows handed over in memory" in card and "bundled task" not in card
    assert not any(p.requires_grad for p in reference.parameters())  # frozen


@pytest.mark.parametrize("rows", ["list", "dataset"])
def test_bad_in_memory_row_names_dataset_and_row_before_any_model_loads(tiny_model_dir, tiny_task, monkeypatch, rows):
    import hypo.models.loading

    monkeypatch.setattr(hypo.models.loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    pairs = _rows(tiny_task["pairs"])
    pairs[6] = {**pairs[6], "chosen": [{"role": "assistant", "content": "  "}]}
    given = datasets.Dataset.from_list(pairs) if rows == "dataset" else pairs
    with pytest.raises(DataError, match=r"^train_dataset: row 7 \(index 6\): field 'chosen': empty text$"):
        HyPOTrainer(model=str(tiny_model_dir), train_dataset=given)
    with pytest.raises(DataError, match=r"eval_prompts: row 1 \(index 0\): field 'prompt': missing"):
        HyPOTrainer(model=str(tiny_model_dir), train_dataset=pairs[:6], eval_prompts=[{"question": "?"}])
    with pytest.raises(DataError, match=r"train_dataset: a DatasetDict \(train\); pass one split"):
        HyPOTrainer(model=str(tiny_model_dir), train_dataset=datasets.DatasetDict({"train": given}))


def test_contradictions_are_refused_before_loading(tiny_model_dir, tiny_task, tmp_path):
    from peft import LoraConfig

    from hypo.config import HyPOConfig

    pairs = _rows(tiny_task["pairs"])
    with pytest.raises(ValueError, match=r"train_dataset is in memory but args.dataset is '.*pairs.jsonl'"):
        HyPOTrainer(model=str(tiny_model_dir), args=HyPOConfig(dataset=str(tiny_task["pairs"])), train_dataset=pairs)
    with pytest.raises(ValueError, match="model is '/elsewhere' but args.model_name_or_path is"):
        HyPOTrainer(model="/elsewhere", args=HyPOConfig(model_name_or_path=str(tiny_model_dir)))
    with pytest.raises(ValueError, match="peft_config asks for LoRA, and so does args.use_peft"):
        HyPOTrainer(model=str(tiny_model_dir), args=HyPOConfig(use_peft=True), train_dataset=pairs,
                    peft_config=LoraConfig(r=4))
    with pytest.raises(TypeError, match="args must be a hypo.HyPOConfig"):
        HyPOTrainer(model=str(tiny_model_dir), args={"beta": 0.1})
    with pytest.raises(ValueError, match="target_kl is measured on held-out prompts"):
        HyPOTrainer(model=str(tiny_model_dir), args=HyPOConfig(target_kl=1.0, eval_steps=2), train_dataset=pairs)


def test_callbacks_see_the_events_and_can_stop_the_run(tiny_model_dir, tiny_task, tmp_path):
    recorder = Recorder(stop_after=2)
    config = _config(tiny_model_dir, tiny_task, tmp_path, "cb", max_steps=5, eval_steps=1,
                     eval_max_prompts_during_training=2)
    trainer = HyPOTrainer(args=config, callbacks=[recorder])
    result = trainer.train()
    assert result.steps == 2 and "control.should_training_stop after step 2" in result.stopped_early
    assert (result.model_dir / "model.safetensors").is_file() and (result.output_dir / "checkpoint-2").is_dir()
    assert recorder.events == [("init_end", 0), ("train_begin", 0), ("step_end", 1), ("step_end", 2), ("save", 2),
                               ("train_end", 2)]
    train_logs = [(step, logs) for step, logs in recorder.logs if "loss" in logs]
    assert [step for step, _ in train_logs] == [1, 2] and "objective/kl" in train_logs[0][1]
    # the periodic evaluation of step 1, then the final one of step 2 (the step the callback stopped at)
    assert [step for step, _ in recorder.evaluations] == [1, 2]
    assert recorder.evaluations[0][1]["eval_num_prompts"] == 2 and recorder.evaluations[-1][1]["eval_num_prompts"] == 2
    assert "eval_objective/kl" in recorder.evaluations[-1][1] and "eval_win_rate" in recorder.evaluations[-1][1]
    assert trainer.state.global_step == 2 and trainer.state.max_steps == 5
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [1, 2]


@pytest.mark.parametrize("method", ["dpo", pytest.param("hypo", marks=pytest.mark.slow)])
def test_resuming_with_a_model_object_reaches_the_same_weights(tiny_model_dir, tiny_task, tmp_path, method):
    """Stopped after step 2 (a checkpoint saved), then resumed by a new trainer handed the same initial model and
    data: the weights of the uninterrupted 4-step run, bit for bit."""
    config = _config(tiny_model_dir, tiny_task, tmp_path, "whole", method=method, max_steps=4, eval_at_end=False)
    model, tokenizer, args, data = _objects(tiny_model_dir, tiny_task, config)
    whole = HyPOTrainer(model=model, args=args, processing_class=tokenizer, **data).train()
    stopped_dir = str(tmp_path / "stopped")
    stopped_args = args.__class__(**{**args.to_dict(), "output_dir": stopped_dir})
    model, tokenizer, _, data = _objects(tiny_model_dir, tiny_task, config)
    HyPOTrainer(model=model, args=stopped_args, processing_class=tokenizer, callbacks=[Recorder(stop_after=2)],
                **data).train()
    model, tokenizer, _, data = _objects(tiny_model_dir, tiny_task, config)
    resumed = HyPOTrainer(model=model, args=stopped_args, processing_class=tokenizer, **data)
    result = resumed.train(resume_from_checkpoint=True)
    assert result.steps == 4
    # the default reference of a loaded model: a frozen copy of it as it was handed over
    assert resumed.ref_model is not model and not any(p.requires_grad for p in resumed.ref_model.parameters())
    assert torch.equal(resumed.ref_model.lm_head.weight, _weights(tiny_model_dir)["lm_head.weight"])
    assert not torch.equal(resumed.model.lm_head.weight, resumed.ref_model.lm_head.weight)
    wa, wb = _weights(whole.model_dir), _weights(result.model_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # other rows in memory than the run's are refused
    model, tokenizer, _, data = _objects(tiny_model_dir, tiny_task, config)
    data["train_dataset"] = data["train_dataset"].select(range(6))
    with pytest.raises(ValueError, match="other in-memory data than the run's"):
        HyPOTrainer(model=model, args=stopped_args, processing_class=tokenizer, **data).train(
            resume_from_checkpoint=True)


def test_evaluate_save_model_and_push_to_hub(tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    pushed = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type):
            pushed.append((repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    config = _config(tiny_model_dir, tiny_task, tmp_path, "evaluated", max_steps=1, eval_dataset=str(tiny_task["pairs"]),
                     eval_dataset_split="train", hub_model_id="me/tiny-hypo")
    trainer = HyPOTrainer(args=config)
    before = trainer.evaluate()  # before training: the policy is the reference
    assert before["eval_objective/kl"] == 0.0 and before["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert before["eval_num_prompts"] == 2 and "eval_rewards/accuracies" in before
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]  # trained on these very pairs
    saved = trainer.save_model(tmp_path / "exported")
    _assert_same_weights(saved, trainer.args.output_dir + "/model", atol=0)
    assert "held-out" in (saved / "README.md").read_text().lower()
    assert trainer.push_to_hub() == "https://huggingface.co/me/tiny-hypo"
    assert pushed[0][0] == "me/tiny-hypo" and "model.safetensors" in pushed[0][1] and "README.md" in pushed[0][1]


def test_lora_from_a_peft_config_trains_as_use_peft(tiny_model_dir, tiny_task, tmp_path):
    from peft import LoraConfig

    common = {"method": "dpo", "max_steps": 2, "eval_at_end": False, "lora_r": 4, "lora_alpha": 8}
    by_option = train(_config(tiny_model_dir, tiny_task, tmp_path, "option", use_peft=True,
                              lora_target_modules="q_proj,v_proj", **common))
    config = _config(tiny_model_dir, tiny_task, tmp_path, "object", **common)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = HyPOTrainer(model=model, args=config, peft_config=LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    result = trainer.train()
    assert trainer.ref_model is None and trainer.args.use_peft and trainer.args.lora_target_modules == "q_proj,v_proj"
    assert (result.model_dir / "adapter" / "adapter_config.json").is_file()
    _assert_same_weights(by_option.model_dir, result.model_dir, atol=0)


@pytest.mark.slow
def test_a_callback_on_the_main_process_stops_every_process(tiny_model_dir, tiny_task, tmp_path):
    """Under `accelerate launch` with 2 CPU processes (gloo): a stop and a checkpoint asked for in `on_log`, which
    runs on the main process only, hold on both processes (no collective is left waiting)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", str(Path(__file__).with_name("callback_worker.py")), str(out),
               str(tiny_model_dir), str(tiny_task["pairs"]), str(tiny_task["prompts"])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["steps"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [2, 2]
    assert (out / "checkpoint-2").is_dir() and (out / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2]

"""Online-RLHF baseline of the language-model lab: a Bradley-Terry reward model trained on the offline
pairs (TRL's RewardTrainer), then KL-regularized RLOO on the unlabeled prompts (TRL's RLOOTrainer),
with the same model, prompts, batch shape, completion length, learning rate and step budget as HyPO.

TRL is an optional dependency (the `trl` extra), imported only here and by `hypo bench`. The run folder gets
the same files as `hypo train` writes (config.json, metrics.jsonl with `time/step` and periodic `eval_*`
keys, eval_results.json), so `hypo report` and `hypo lab lm` read it like any other run.

    python -m hypo.lab.rlhf --output-dir runs/rlhf --kl-coef 0.05 --seed 42
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

TRL_CPU_SETTINGS = {"bf16": False, "use_cpu": True, "report_to": "none", "save_strategy": "no",
                    "activation_checkpointing": False, "dataloader_num_workers": 0}
"""TrainingArguments that keep TRL on fp32 CPU without checkpointing or trackers (GPU users drop use_cpu)."""


@dataclass
class RLHFSettings:
    """One RLHF run: the reward model (shared by runs of one seed) and the KL-regularized RLOO stage."""

    output_dir: str
    kl_coef: float = 0.05
    seed: int = 42
    model: str | None = None  # default: the embedded SmolLM2-135M-Instruct
    task: str = "reviews"
    pairs: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    reward_model_dir: str | None = None  # trained here when it holds no model yet
    reward_learning_rate: float = 1e-5
    reward_epochs: float = 1.0
    reward_batch_size: int = 8
    learning_rate: float = 1e-5
    max_steps: int = 30
    prompt_batch_size: int = 4
    num_generations: int = 2
    max_completion_length: int = 64
    max_prompt_length: int = 128
    eval_steps: int = 10
    eval_max_prompts: int = 64
    eval_max_prompts_during_training: int = 16
    eval_num_samples: int = 2
    eval_batch_size: int = 16


def _dataset(path: str):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def train_reward_model(settings: RLHFSettings, model_path: str, pairs_path: str, out: Path) -> float:
    """Fit a Bradley-Terry reward model (a scalar head on the base model) on the pairs; returns seconds."""
    from trl import RewardConfig, RewardTrainer

    from hypo.models import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    args = RewardConfig(output_dir=str(out), learning_rate=settings.reward_learning_rate,
                        num_train_epochs=settings.reward_epochs, per_device_train_batch_size=settings.reward_batch_size,
                        seed=settings.seed, logging_steps=1, max_length=settings.max_prompt_length + 128,
                        **TRL_CPU_SETTINGS)
    trainer = RewardTrainer(model=model_path, args=args, train_dataset=_dataset(pairs_path), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    (out / "reward_model_log.json").write_text(json.dumps({"seconds": seconds, "log": trainer.state.log_history}))
    return seconds


class EvalAndTimeCallback(TrainerCallback):
    """Logs TRL's step records with `time/step`, and every `eval_steps` optimizer steps runs the same
    held-out evaluation as `hypo train`, logged as eval_* keys."""

    def __init__(self, run_logger, evaluate, every: int):
        self.run_logger, self.evaluate, self.every = run_logger, evaluate, every
        self.step_start, self.step_seconds = time.perf_counter(), 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_seconds = time.perf_counter() - self.step_start
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            metrics = self.evaluate(model)["metrics"]
            self.run_logger.log({f"eval_{k}": v for k, v in metrics.items()}, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            trl_metrics = {f"trl/{k}": v for k, v in logs.items() if isinstance(v, int | float)}
            self.run_logger.log({"loss": logs["loss"], "time/step": self.step_seconds, **trl_metrics},
                                state.global_step)


class _JsonlLogger:
    """Appends step records to metrics.jsonl in `hypo train`'s format (one JSON object per line)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def run_rlhf(settings: RLHFSettings) -> dict:
    """Reward model (if not trained yet), RLOO with the KL penalty, then the held-out evaluation."""
    import torch
    from trl import RLOOConfig, RLOOTrainer

    from hypo.data import load_prompt_data
    from hypo.evaluate import evaluate_policy, write_eval_results
    from hypo.models import Reference, load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.tasks import get_task

    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(settings.task)
    model_path = resolve_model_path(settings.model)
    pairs, prompts = settings.pairs or str(task.pairs), settings.prompts or str(task.prompts)
    eval_prompts_path = settings.eval_prompts or str(task.eval_prompts)
    rm_dir = Path(settings.reward_model_dir or out / "reward_model")
    rm_seconds = 0.0
    if not (rm_dir / "config.json").is_file():
        rm_seconds = train_reward_model(settings, model_path, pairs, rm_dir)
    (out / "config.json").write_text(json.dumps({**asdict(settings), "method": "rlhf", "beta": None,
                                                 "reward_model_seconds": rm_seconds}, indent=2))

    tokenizer = load_tokenizer(model_path)
    reward_tokenizer = load_tokenizer(str(rm_dir))
    eval_items, _ = load_prompt_data(eval_prompts_path, tokenizer, max_prompt_length=settings.max_prompt_length)
    reference = Reference(load_causal_lm(model_path))
    run_logger = _JsonlLogger(out / "metrics.jsonl")

    def evaluate(model, limit: int = settings.eval_max_prompts_during_training, seed: int = settings.seed):
        items = eval_items[:limit] if limit else eval_items
        return evaluate_policy(model, reference, tokenizer, items, judge=task.judge,
                               num_samples=settings.eval_num_samples, max_new_tokens=settings.max_completion_length,
                               batch_size=settings.eval_batch_size, seed=seed)

    completions_per_step = settings.prompt_batch_size * settings.num_generations
    args = RLOOConfig(output_dir=str(out / "trl"), learning_rate=settings.learning_rate, max_steps=settings.max_steps,
                      per_device_train_batch_size=completions_per_step, num_generations=settings.num_generations,
                      steps_per_generation=1, max_completion_length=settings.max_completion_length,
                      beta=settings.kl_coef, temperature=1.0, top_p=1.0, top_k=0, seed=settings.seed,
                      logging_steps=1, lr_scheduler_type="linear", warmup_steps=round(0.1 * settings.max_steps), max_grad_norm=1.0,
                      model_init_kwargs={"dtype": torch.float32}, **TRL_CPU_SETTINGS)
    trainer = RLOOTrainer(model=model_path, reward_funcs=str(rm_dir), args=args, train_dataset=_dataset(prompts),
                          processing_class=tokenizer, reward_processing_classes=reward_tokenizer,
                          callbacks=[EvalAndTimeCallback(run_logger, evaluate, settings.eval_steps)])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    policy = trainer.model
    results = evaluate(policy, settings.eval_max_prompts)
    results["settings"].update(method="rlhf", kl_coef=settings.kl_coef, train_seconds=train_seconds,
                               reward_model_seconds=rm_seconds)
    write_eval_results(results, out)
    run_logger.log({f"eval_{k}": v for k, v in results["metrics"].items()}, settings.max_steps)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypo.lab.rlhf", description=__doc__.split("\n\n")[0])
    defaults = RLHFSettings(output_dir="")
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else str
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value, required=name == "output_dir")
    settings = RLHFSettings(**vars(p.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_rlhf(settings)
    metrics = results["metrics"]
    print(f"rlhf kl_coef={settings.kl_coef} seed={settings.seed}: reverse KL {metrics['objective/kl']:.3f}, "
          f"win rate {metrics['win_rate']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

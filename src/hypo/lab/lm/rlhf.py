"""Online-RLHF baseline of the language-model lab: a Bradley-Terry reward model trained on the offline
pairs (TRL's RewardTrainer), then KL-regularized RLOO on the unlabeled prompts (TRL's RLOOTrainer).

Its settings are a `HyPOConfig` (model, data, prompts per step, k, lengths, learning rate, schedule,
clipping, step budget, evaluation; `kl_coef` is RLOO's KL penalty) plus a `RewardModelConfig`, so an RLHF
run and a HyPO run given the same options train under the same settings. TRL is an optional dependency
(the `trl` extra). The run folder gets the same files as `hypo train` writes (config.json, metrics.jsonl
with `time/step` and periodic `eval_*` keys, eval_results.json), so `hypo report` and `hypo lab lm` read
it like any other run.

    hypo lab rlhf --output_dir runs/rlhf --kl_coef 0.05 --seed 42 --eval_steps 10
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import TrainerCallback

from hypo.config import HyPOConfig


@dataclass
class RewardModelConfig:
    """The reward model of an RLHF run (trained once per folder, shared by runs of one seed)."""

    reward_model_dir: str | None = field(default=None, metadata={
        "help": "Folder of the reward model: trained here when it holds no model yet (default: <output_dir>/reward_model)."})
    reward_learning_rate: float = field(default=1e-5, metadata={"help": "Reward-model learning rate."})
    reward_epochs: float = field(default=1.0, metadata={"help": "Epochs of reward-model training over the pairs."})
    reward_batch_size: int = field(default=8, metadata={"help": "Pairs per reward-model step."})

    def __post_init__(self) -> None:
        if self.reward_learning_rate <= 0 or self.reward_epochs <= 0 or self.reward_batch_size < 1:
            raise ValueError("reward_learning_rate and reward_epochs must be > 0 and reward_batch_size >= 1")


def _dataset(path: str):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def train_reward_model(config: HyPOConfig, reward: RewardModelConfig, model_path: str, pairs_path: str,
                       out: Path) -> float:
    """Fit a Bradley-Terry reward model (a scalar head on the base model) on the pairs; returns seconds."""
    from trl import RewardConfig, RewardTrainer

    from hypo.models.loading import load_tokenizer
    from hypo.training.trl_args import trl_training_args

    start = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    common = trl_training_args(config, max_steps=-1)  # an epoch budget, not the policy's step budget
    common.update(learning_rate=reward.reward_learning_rate, lr_scheduler_type="linear", warmup_steps=0)
    args = RewardConfig(output_dir=str(out), num_train_epochs=reward.reward_epochs,
                        per_device_train_batch_size=reward.reward_batch_size, max_length=config.max_length, **common)
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


def run_rlhf(config: HyPOConfig, reward: RewardModelConfig) -> dict:
    """Reward model (if not trained yet), RLOO with the KL penalty, then the held-out evaluation."""
    from trl import RLOOConfig, RLOOTrainer

    from hypo.data.sources import load_training_data
    from hypo.evaluation.held_out import evaluate_policy, write_eval_results
    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from hypo.models.reference import Reference
    from hypo.tasks import get_task
    from hypo.training.tracking import RunLogger
    from hypo.training.trl_args import trl_rloo_args

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    model_path = resolve_model_path(config.model_name_or_path, config.gguf_file)
    pairs, prompts = config.dataset or str(task.pairs), config.prompts or str(task.prompts)
    rm_dir = Path(reward.reward_model_dir or out / "reward_model")
    rm_seconds = 0.0
    if not (rm_dir / "config.json").is_file():
        rm_seconds = train_reward_model(config, reward, model_path, pairs, rm_dir)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), **asdict(reward), "method": "rlhf", "beta": None,
                                                 "reward_model_seconds": rm_seconds}, indent=2))

    tokenizer = load_tokenizer(model_path)
    data = load_training_data(replace(config, method="dpo"), tokenizer)  # held-out prompts and judge (TRL reads the prompts)
    reference = Reference(load_causal_lm(model_path))
    run_logger = RunLogger(out)

    def evaluate(model, limit: int = config.eval_max_prompts_during_training):
        items = data.eval_prompts[:limit] if limit else data.eval_prompts
        return evaluate_policy(model, reference, tokenizer, items, judge=data.judge,
                               num_samples=config.eval_num_samples, max_new_tokens=config.max_completion_length,
                               batch_size=config.eval_batch_size, seed=config.seed,
                               temperature=config.eval_temperature, top_p=config.eval_top_p)

    args = RLOOConfig(output_dir=str(out / "trl"), **trl_rloo_args(config))
    trainer = RLOOTrainer(model=model_path, reward_funcs=str(rm_dir), args=args, train_dataset=_dataset(prompts),
                          processing_class=tokenizer, reward_processing_classes=load_tokenizer(str(rm_dir)),
                          callbacks=[EvalAndTimeCallback(run_logger, evaluate, config.eval_steps)])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    results = evaluate(trainer.model, config.eval_max_prompts)
    results["settings"].update(method="rlhf", kl_coef=config.kl_coef, train_seconds=train_seconds,
                               reward_model_seconds=rm_seconds)
    write_eval_results(results, out)
    run_logger.log({f"eval_{k}": v for k, v in results["metrics"].items()}, config.max_steps)
    return results

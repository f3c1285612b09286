"""HyPO from a notebook: a loaded model and `datasets.Dataset`s in memory, `HyPOTrainer` with a callback,
evaluation, saving. Each numbered block is what a notebook cell would hold.

    python docs/examples/notebook_workflow.py                                   # hypo's embedded SmolLM2-135M-Instruct
    python docs/examples/notebook_workflow.py --model HuggingFaceTB/SmolLM2-135M-Instruct   # any causal LM

The data are the bundled task's files read into `datasets.Dataset`s; any Dataset (or list of dicts) in TRL's
formats works the same way. The test suite runs this file on a tiny model (tests/test_examples.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from hypo import HyPOConfig, HyPOTrainer


class KLWatch(TrainerCallback):
    """Custom logging and stopping: prints each logged step and each evaluation, and stops training once the online
    samples' KL estimate (`objective/kl`, HyPO's training metric) passes `max_kl` nats."""

    def __init__(self, max_kl: float) -> None:
        self.max_kl = max_kl

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            print(f"step {state.global_step}: loss {logs['loss']:.4f}, online KL {logs.get('objective/kl', 0):.3f}")
            if logs.get("objective/kl", 0.0) > self.max_kl:
                print(f"online KL above {self.max_kl}: stopping")
                control.should_training_stop = True  # the run ends after this step, its model saved as usual

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        print(f"step {state.global_step}: held-out KL {metrics['eval_objective/kl']:.3f} "
              f"+- {metrics['eval_objective/kl_se']:.3f}, win rate {metrics.get('eval_win_rate', float('nan')):.3f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a hub id or a folder (default: hypo's embedded model)")
    parser.add_argument("--output_dir", default="runs/notebook-example")
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--eval_max_prompts", type=int, default=16)
    args = parser.parse_args(argv)

    # 1. A model and its tokenizer, loaded as usual
    if args.model is None:
        from hypo.models.loading import resolve_model_path

        args.model = resolve_model_path(None)  # the embedded GGUF, converted once into a local folder
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    # 2. Data in memory: preference pairs, unlabeled prompts for the online term, held-out prompts
    from hypo.tasks import get_task

    task = get_task("reviews")
    pairs = datasets.Dataset.from_json(str(task.pairs))
    prompts = datasets.Dataset.from_json(str(task.prompts))
    held_out = datasets.Dataset.from_json(str(task.eval_prompts))

    # 3. Train: HyPO (DPO on the pairs + kl_coef * reverse KL on fresh samples), evaluated every 5 steps
    config = HyPOConfig(method="hypo", beta=0.1, kl_coef=0.05, max_steps=args.max_steps, learning_rate=1e-5,
                        per_device_train_batch_size=4, per_device_prompt_batch_size=4, max_length=args.max_length,
                        max_prompt_length=min(128, args.max_length // 2),
                        max_completion_length=args.max_completion_length, judge="review-sentiment", eval_steps=5,
                        eval_max_prompts_during_training=4, eval_max_prompts=args.eval_max_prompts,
                        eval_at_end=False, output_dir=args.output_dir, overwrite_output_dir=True)
    trainer = HyPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=pairs,
                          prompt_dataset=prompts, eval_prompts=held_out, callbacks=[KLWatch(max_kl=5.0)])
    result = trainer.train()
    print(f"trained {result.steps} steps in {result.seconds:.0f} s")

    # 4. Evaluate the trained model now: reverse KL to the reference, gold-judge win rate against it
    metrics = trainer.evaluate()
    print({key: round(value, 4) for key, value in metrics.items() if key in
           ("eval_objective/kl", "eval_objective/kl_se", "eval_win_rate", "eval_num_prompts")})

    # 5. Save in Hugging Face format, and load it back as any model
    saved = trainer.save_model(Path(args.output_dir) / "my-model")
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    print(f"saved to {saved}; reloaded {type(reloaded).__name__} with "
          f"{sum(p.numel() for p in reloaded.parameters()):,} parameters")
    return {"result": result, "metrics": metrics, "saved": saved}


if __name__ == "__main__":
    main()

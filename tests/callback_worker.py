"""One process of the two-process callback test (run by `accelerate launch` from tests/test_hypo_trainer.py):
HyPOTrainer with a callback that, on the main process only, asks in `on_log` (an event of the main process) for a
checkpoint and a stop after step 2. Every process must follow, or the next collective would hang. Each process
writes `rank<i>.json` with the step it ended at.

    accelerate launch --multi_gpu --num_processes 2 tests/callback_worker.py OUT MODEL PAIRS PROMPTS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback


class StopOnMainProcess(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and "loss" in logs and state.global_step == 2:
            control.should_save = control.should_training_stop = True


def main(out: str, model: str, pairs: str, prompts: str) -> None:
    from hypo import HyPOConfig, HyPOTrainer

    config = HyPOConfig(model_name_or_path=model, dataset=pairs, prompts=prompts, method="hypo", max_steps=6,
                        per_device_train_batch_size=2, per_device_prompt_batch_size=2, max_completion_length=6,
                        max_length=64, max_prompt_length=32, learning_rate=1e-3, eval_at_end=False, output_dir=out)
    trainer = HyPOTrainer(args=config, callbacks=[StopOnMainProcess()])
    result = trainer.train()
    rank = trainer.accelerator.process_index
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": result.steps, "global_step": trainer.state.global_step,
                                                         "stopped_early": result.stopped_early}))


if __name__ == "__main__":
    main(*sys.argv[1:5])

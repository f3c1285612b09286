"""One process of the sharded-training test (run by torchrun from tests/test_sharded.py): a few DPO and
HyPO steps with the policy sharded by FSDP2 (`fully_shard`, as accelerate's FSDP2 plugin shards it on GPUs)
or not, then the same collective save and evaluation as `hypo.trainer.train`.

    torchrun --nproc_per_node 2 tests/sharded_worker.py OUT MODEL PAIRS PROMPTS EVAL_PROMPTS sharded
    python tests/sharded_worker.py OUT MODEL PAIRS PROMPTS EVAL_PROMPTS single
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: str, model: str, pairs: str, prompts: str, eval_prompts: str, mode: str) -> None:
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hypo.checkpoints import save_model
    from hypo.config import HyPOConfig
    from hypo.data import PairCollator, PromptCollator, ShuffledBatches, load_training_data
    from hypo.evaluate import evaluate_during_training
    from hypo.models import load_policy_and_reference
    from hypo.steps import StepContext, dpo_step, kl_step
    from hypo.tracking import RunLogger
    from hypo.trainer import make_optimizer, seed_everything

    sharded = mode == "sharded"
    accelerator = Accelerator(cpu=True)
    processes = accelerator.num_processes
    micro_steps = 1 if sharded else 2  # 2 processes x 1 micro-batch == 1 process x 2 micro-batches
    config = HyPOConfig(model_name_or_path=model, dataset=pairs, prompts=prompts, eval_prompts=eval_prompts,
                        judge="review-sentiment", per_device_train_batch_size=2, per_device_prompt_batch_size=2,
                        max_completion_length=6, max_length=64, max_prompt_length=32, learning_rate=1e-3,
                        kl_coef=0.5, eval_max_prompts=2, num_threads=1)
    torch.set_num_threads(1)
    seed_everything(config.seed)
    tokenizer, policy, reference = load_policy_and_reference(config)
    if sharded:
        mesh = init_device_mesh("cpu", (processes,))
        for layer in policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
    reference.prepare(accelerator)
    data = load_training_data(config, tokenizer, with_prompts=True)
    shard = {"process_index": accelerator.process_index, "num_processes": processes}
    pair_batches = ShuffledBatches(data.pairs, 2, PairCollator(tokenizer.pad_token_id), seed=0, what="pairs", **shard)
    prompt_batches = ShuffledBatches(data.prompts, 2, PromptCollator(tokenizer.pad_token_id), seed=1, what="prompts",
                                     **shard)
    optimizer = make_optimizer(list(policy.parameters()), config, torch.device("cpu"))
    ctx = StepContext(policy=policy, sampler=policy, reference=reference, config=config,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, share_prompt=True,
                      ref_cache=None)
    losses = []
    for step in range(2):
        for micro in range(micro_steps):
            batch_index = step * 2 + (accelerator.process_index if sharded else micro)  # the same global batch
            offline = dpo_step(ctx, next(pair_batches))
            torch.manual_seed(1000 + batch_index)  # the same samples for the same global batch in both modes
            online = kl_step(ctx, next(prompt_batches))
            ((offline.loss + config.kl_coef * online.loss) / micro_steps).backward()
            losses.append(float(offline.loss))
        accelerator.clip_grad_norm_(list(policy.parameters()), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out_dir = Path(out)
    save_model(accelerator, policy, tokenizer, out_dir / "model")
    run_logger = RunLogger(out_dir, accelerator)
    evaluate_during_training(accelerator, policy, reference, tokenizer, data, config, run_logger, 2, final=True,
                             output_dir=out_dir)
    if accelerator.is_main_process:
        (out_dir / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(*sys.argv[1:7])

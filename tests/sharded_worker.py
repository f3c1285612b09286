"""One process of the sharded-training test (run by torchrun from tests/test_sharded.py): a few DPO and
HyPO steps with the policy sharded by FSDP2 (`fully_shard`, as accelerate's FSDP2 plugin shards it on GPUs)
and the reference sharded by `Reference.prepare` (accelerate's `fsdp2_prepare_model`, driven through a
stand-in for the FSDP2 accelerator that accelerate does not build on CPUs), or neither; then the same
collective save and evaluations as `hypo.training.trainer.train`.

The reference cache starts with the rows of global batch 0 (scored by an unsharded copy of the reference),
so in the first step process 0 has all its rows cached and process 1 none: the processes must still run
the sharded reference together. Each process writes `rank<i>.json`: its share of the reference's weights,
its reference forward calls per micro-step, and its cache.

    torchrun --nproc_per_node 2 tests/sharded_worker.py OUT MODEL PAIRS PROMPTS EVAL_PROMPTS sharded
    python tests/sharded_worker.py OUT MODEL PAIRS PROMPTS EVAL_PROMPTS single
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


class CpuFsdp2Accelerator:
    """The real (gloo, CPU) accelerator seen as an FSDP2 one with `plugin`: accelerate drops FSDP on CPUs."""

    is_fsdp2 = True

    def __init__(self, accelerator, plugin):
        self._accelerator, self.state = accelerator, SimpleNamespace(fsdp_plugin=plugin)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def main(out: str, model: str, pairs: str, prompts: str, eval_prompts: str, mode: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hypo.config import HyPOConfig
    from hypo.data.batches import PairCollator, PromptCollator, ShuffledBatches
    from hypo.data.sources import load_training_data
    from hypo.evaluation.held_out import evaluate_during_training
    from hypo.evaluation.pairs import evaluate_pairs
    from hypo.models.loading import load_causal_lm, load_policy_and_reference
    from hypo.objective.logprobs import pair_logps
    from hypo.runtime.accelerator import seed_everything
    from hypo.runtime.distributed import local_tensor
    from hypo.training.checkpoints import save_model
    from hypo.training.setup import make_optimizer
    from hypo.training.steps import StepContext, dpo_step, kl_step
    from hypo.training.tracking import RunLogger

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
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        reference.prepare(CpuFsdp2Accelerator(accelerator, plugin))
    else:
        reference.prepare(accelerator)
    reference_calls = [0]
    reference.model.register_forward_pre_hook(lambda *_: reference_calls.__setitem__(0, reference_calls[0] + 1))
    data = load_training_data(config, tokenizer)
    shard = {"process_index": accelerator.process_index, "num_processes": processes}
    pair_batches = ShuffledBatches(data.pairs, 2, PairCollator(tokenizer.pad_token_id), seed=0, what="pairs", **shard)
    prompt_batches = ShuffledBatches(data.prompts, 2, PromptCollator(tokenizer.pad_token_id), seed=1, what="prompts",
                                     **shard)
    ref_cache = {}
    if accelerator.process_index == 0:  # global batch 0, scored by an unsharded copy of the reference
        first = next(ShuffledBatches(data.pairs, 2, PairCollator(tokenizer.pad_token_id), seed=0, what="pairs"))
        with torch.no_grad():
            chosen, rejected = pair_logps(load_causal_lm(model).eval(), first, pad_token_id=tokenizer.pad_token_id,
                                          share_prompt=True)
        rows = zip(first["index"].tolist(), chosen.tolist(), rejected.tolist(), strict=True)
        ref_cache = {i: (c, r) for i, c, r in rows}
    optimizer = make_optimizer(list(policy.parameters()), config, torch.device("cpu"))
    ctx = StepContext(policy=policy, sampler=policy, reference=reference, config=config,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, share_prompt=True,
                      ref_cache=ref_cache, accelerator=accelerator)
    losses, calls = [], []
    for step in range(3):  # 4 batches of pairs per epoch: step 2 starts the second epoch
        for micro in range(micro_steps):
            batch_index = step * 2 + (accelerator.process_index if sharded else micro)  # the same global batch
            before = reference_calls[0]
            offline = dpo_step(ctx, next(pair_batches))
            middle = reference_calls[0]
            torch.manual_seed(1000 + batch_index)  # the same samples for the same global batch in both modes
            online = kl_step(ctx, next(prompt_batches))
            calls.append([middle - before, reference_calls[0] - middle])  # reference forwards: dpo, kl
            ((offline.loss + config.kl_coef * online.loss) / micro_steps).backward()
            losses.append(float(offline.loss))
        accelerator.clip_grad_norm_(list(policy.parameters()), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    parameters = list(reference.model.parameters())
    record = {"reference_numel": sum(p.numel() for p in parameters),
              "reference_local_numel": sum(local_tensor(p).numel() for p in parameters),
              "reference_calls": calls, "cache": {str(i): list(v) for i, v in sorted(ctx.ref_cache.items())}}
    out_dir = Path(out)
    save_model(accelerator, policy, tokenizer, out_dir / "model")
    run_logger = RunLogger(out_dir, accelerator)
    evaluate_during_training(accelerator, policy, reference, tokenizer, data, config, run_logger, 3, final=True,
                             output_dir=out_dir)
    record["pair_metrics"] = evaluate_pairs(ctx, data.pairs[:4], batch_size=1, accelerator=accelerator)
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    if accelerator.is_main_process:
        (out_dir / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    from hypo.runtime.accelerator import close_process_groups

    main(*sys.argv[1:7])
    close_process_groups()  # as `hypo train` does before it exits: left to the exit, gloo can abort the process

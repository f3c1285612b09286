"""`hypo plan`'s arithmetic against what a CPU allocates for a real model (default: the embedded SmolLM2-135M).

Run: .venv/bin/python scripts/check_memory_plan.py [--model PATH] [--pairs 2] [--length 128]

For one DPO micro-step of `--pairs` pairs whose prompt and completions are `--length / 2` tokens each, float32
weights without autocast (a CPU's precision), full fine-tuning and LoRA r 16:
- weights, gradients and AdamW moments: the bytes of the tensors after a real fused-AdamW step;
- activations: the bytes the forward saves for its backward (`torch.autograd.graph.saved_tensors_hooks`, each
  storage once, parameters excluded), against the plan's activations plus the float32 logits it keeps;
- peak (full fine-tuning only: torch's MemTracker does not take frozen parameters): the largest total of the
  forward and backward beyond weights and gradients, against the plan's activations + logits.
Memory only, so the numbers do not depend on how loaded the machine is.
"""

from __future__ import annotations

import argparse

import torch


def saved_bytes(model, fn) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    from hypo.config import DEFAULT_MODEL, HyPOConfig
    from hypo.models.loading import add_lora, load_causal_lm, resolve_model_path
    from hypo.objective.logprobs import pair_logps
    from hypo.planning.memory import Launch, memory_plan
    from hypo.planning.shapes import model_shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    shape = model_shape(args.model if args.model == DEFAULT_MODEL else path)
    half = args.length // 2
    gen = torch.Generator().manual_seed(0)
    batch = {"prompt_input_ids": torch.randint(10, shape.vocab_size, (args.pairs, half), generator=gen),
             "prompt_attention_mask": torch.ones(args.pairs, half, dtype=torch.long)}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = torch.randint(10, shape.vocab_size, (args.pairs, half), generator=gen)
        batch[f"{side}_attention_mask"] = torch.ones(args.pairs, half, dtype=torch.long)
    print(f"{args.model}: {shape.params / 1e6:.1f}M parameters, {args.pairs} pairs x {args.length} tokens, float32, "
          "no autocast")
    print("| run | part | planned (MB) | measured (MB) | measured / planned |")
    print("| --- | --- | ---: | ---: | ---: |")
    for lora in (False, True):
        name = "LoRA r 16" if lora else "full"
        config = HyPOConfig(method="dpo", model_name_or_path=path, mixed_precision="no", use_peft=lora, lora_r=16,
                            per_device_train_batch_size=args.pairs, max_prompt_length=half,
                            max_completion_length=half, max_length=args.length, eval_at_end=False)
        step = memory_plan(config, shape, Launch()).phases["offline step"]
        model = load_causal_lm(path)
        if lora:
            model = add_lora(model, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-6, fused=True)

        def forward(model=model):
            chosen, rejected = pair_logps(model, batch, pad_token_id=0, share_prompt=False)
            return (chosen - rejected).sum()

        saved = saved_bytes(model, forward)
        kept_logits = 2 * args.pairs * (half + 1) * shape.vocab_size * 4  # float32 logits saved by the log-softmax
        rows = [("activations + kept logits", step["activations"] + kept_logits, saved)]
        if not lora:
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                forward().backward()
            peak = {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
            beyond = peak["Total"] - peak["Parameter"] - peak["Gradient"] - peak["Buffer"]
            rows.append(("peak beyond weights and gradients", step["activations"] + step["logits"], beyond))
        else:
            forward().backward()
        optimizer.step()
        nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
        moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
        rows = [("weights", step["weights"], nbytes(model.parameters())),
                ("gradients", step["gradients"], nbytes(p.grad for p in trained)),
                ("AdamW moments", step["optimizer"], nbytes(moments))] + rows
        for part, planned, measured in rows:
            print(f"| {name} | {part} | {planned / 1e6:.1f} | {measured / 1e6:.1f} | {measured / planned:.3f} |")


if __name__ == "__main__":
    main()

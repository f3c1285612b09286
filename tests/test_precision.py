"""Mixed precision as users expect it: float32 master weights with bf16 autocast keep every update (bf16
autocast runs on CPUs too), the reference runs under the same autocast, pure bf16 weights lose most
updates (what their warning says), float16 weights are refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import _config, _weights

from hypo.config import HyPOConfig
from hypo.runtime.precision import resolve_mixed_precision
from hypo.training.trainer import train


def _fraction_changed(model_dir, initial_dir) -> float:
    after, before = _weights(model_dir), _weights(initial_dir)
    changed = sum((after[k].float() != before[k].to(after[k].dtype).float()).sum().item() for k in after)
    return changed / sum(v.numel() for v in after.values())


def test_bf16_autocast_keeps_every_update_and_pure_bf16_weights_lose_most(tiny_model_dir, tiny_task, tmp_path):
    common = {"method": "dpo", "max_steps": 4, "learning_rate": 1e-5, "warmup_ratio": 0.0, "eval_at_end": False}
    mixed = train(_config(tiny_model_dir, tiny_task, tmp_path, "mixed", mixed_precision="bf16", **common))
    with pytest.warns(UserWarning, match="rounded away"):
        pure_config = _config(tiny_model_dir, tiny_task, tmp_path, "pure", mixed_precision="bf16", dtype="bfloat16",
                              **common)
    pure = train(pure_config)
    assert next(iter(_weights(mixed.model_dir).values())).dtype == torch.float32  # master weights stay fp32
    mixed_fraction = _fraction_changed(mixed.model_dir, tiny_model_dir)
    pure_fraction = _fraction_changed(pure.model_dir, tiny_model_dir)
    assert mixed_fraction > 0.99, mixed_fraction
    assert pure_fraction < 0.5, pure_fraction  # the warning's claim, on this tiny model
    print(f"weight elements changed after 4 steps at lr 1e-5: fp32 weights + bf16 autocast {mixed_fraction:.3f}, "
          f"bf16 weights {pure_fraction:.3f}")


def test_the_reference_runs_under_the_same_autocast(tiny_model_dir, tiny_task, tmp_path):
    """At step 1 the policy is the reference: under one autocast their log-probs are equal, so the DPO margin
    and the sampled log-ratio are exactly 0 (a float32 reference beside a bf16 policy would differ)."""
    result = train(_config(tiny_model_dir, tiny_task, tmp_path, "ref", method="hypo", mixed_precision="bf16",
                           max_steps=1, eval_at_end=False, precompute_ref_log_probs=False))
    first = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/margins"] == 0.0 and first["objective/kl"] == 0.0
    assert first["loss/dpo"] == pytest.approx(0.693147, abs=1e-6)


def test_auto_is_no_mixed_precision_on_cpu_and_fp16_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert resolve_mixed_precision("auto") == "no" and resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16")


def test_float16_weights_are_refused():
    with pytest.raises(ValueError, match="float16 weights are refused"):
        HyPOConfig(dtype="float16")

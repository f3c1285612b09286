"""The offline step against TRL's own code: TRL 1.16's DPOTrainer computes its loss (`compute_loss`, with the
reference run live: precompute_ref_log_probs False) and hypo's `dpo_step` computes its own, on the same tiny
policy, reference and pairs. For every loss type, weighted sums and f-divergences: equal losses, equal gradients
of every weight, equal implicit rewards."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_model
from hypo.config import HyPOConfig
from hypo.data.batches import PairCollator
from hypo.models.reference import Reference
from hypo.training.steps import StepContext, dpo_step

trl = pytest.importorskip("trl")

LENGTHS = [(4, 5, 5), (6, 7, 7), (3, 4, 6), (5, 9, 3), (4, 6, 6)]
"""(prompt, chosen, rejected) tokens of each pair: several lengths, so the per-token forms are tested, and equal
lengths within most pairs, so that the margins' order comes from the models and differs between policy and
reference (`test_the_batch_exercises_sorting`): aot's sorting is then tested too."""

SLOW = pytest.mark.slow  # about 2 CPU-seconds a case: the fast suite keeps one case per loss type and a few mixes
CASES = [  # (loss_type, options): each TRL loss type alone, the combinations TRL documents, and f-divergences
    *[(name, {}) for name in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")],
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("robust", {"label_smoothing": 0.1}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),  # MPO, TRL's example weights
    (["robust", "sft"], {"f_divergence_type": "js_divergence", "label_smoothing": 0.1}),
    (["sigmoid", "ipo"], {"ld_alpha": 0.3}),  # LD-DPO: ld-weighted log-probs, ipo still divides by full lengths
    pytest.param("aot", {"label_smoothing": 0.2}, marks=SLOW),
    pytest.param("aot_unpaired", {"label_smoothing": 0.2}, marks=SLOW),
    pytest.param("discopop", {"discopop_tau": 0.5}, marks=SLOW),
    pytest.param(["sigmoid", "sft"], {"loss_weights": [1.0, 0.2]}, marks=SLOW),  # RPO
    pytest.param(["ipo", "sigmoid_norm", "aot"], {}, marks=SLOW),  # default weights 1
    pytest.param("sigmoid", {"f_divergence_type": "forward_kl"}, marks=SLOW),
    pytest.param("ipo", {"f_divergence_type": "js_divergence"}, marks=SLOW),
    pytest.param("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, marks=SLOW),
    pytest.param("aot", {"ld_alpha": 0.0}, marks=SLOW),
]


def _items(tokenizer) -> list[dict]:
    """Random token ids (seeded) in hypo's item format, each completion ending with EOS as both libraries add it."""
    generator = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, len(tokenizer), (n,), generator=generator).tolist()  # no special tokens

    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c - 1) + [tokenizer.eos_token_id],
             "rejected_input_ids": ids(r - 1) + [tokenizer.eos_token_id], "index": i}
            for i, (p, c, r) in enumerate(LENGTHS)]


def _trl_loss_and_grads(policy, reference, tokenizer, items, loss_type, options, tmp_path):
    """TRL's loss on the pairs, from a DPOTrainer built as a TRL user builds it, and its gradient."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, beta=0.5, precompute_ref_log_probs=False,
                     per_device_train_batch_size=len(items), max_length=None, use_cpu=True, bf16=False,
                     activation_checkpointing=False, report_to="none", **options)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "Hi.", "chosen": "Yes.", "rejected": "No."}]))
    # (a dataset is required; the loss below runs on our own batch, collated by TRL's collator)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": i["prompt_input_ids"], "chosen_ids": i["chosen_input_ids"],
          "rejected_ids": i["rejected_input_ids"]} for i in items])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    grads = torch.autograd.grad(loss, list(trainer.model.parameters()))
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _hypo_loss_and_grads(policy, reference, tokenizer, items, loss_type, options, share_prompt):
    config = HyPOConfig(method="dpo", loss_type=loss_type, beta=0.5, **options)
    ctx = StepContext(policy=policy, sampler=policy, reference=Reference(reference), config=config,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      share_prompt=share_prompt, ref_cache=None)
    policy.train()
    term = dpo_step(ctx, PairCollator(tokenizer.pad_token_id)(items))
    grads = torch.autograd.grad(term.loss, list(policy.parameters()))
    return term.loss.detach(), grads, {k: float(v) for k, v in term.metrics.items()}


def _models(tokenizer):
    """A policy and a reference that differ (two random initializations), so every log-ratio is non-zero."""
    return build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)


@pytest.mark.parametrize(("loss_type", "options"), CASES, ids=lambda value: str(value))
def test_hypo_offline_step_equals_trl_dpo_trainer(tiny_tokenizer, tmp_path, loss_type, options):
    items = _items(tiny_tokenizer)
    policy, reference = _models(tiny_tokenizer)
    hypo_models = copy.deepcopy(policy), copy.deepcopy(reference)  # before TRL patches its models' forward
    trl_loss, trl_grads, trl_metrics = _trl_loss_and_grads(policy, reference, tiny_tokenizer, items, loss_type,
                                                           options, tmp_path)
    share_prompt = len(str(loss_type)) % 2 == 0  # both scoring paths, across the cases
    loss, grads, metrics = _hypo_loss_and_grads(*hypo_models, tiny_tokenizer, items, loss_type, options, share_prompt)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(trl_grads)
    for grad, trl_grad in zip(grads, trl_grads, strict=True):  # float32 rounding differs (TRL's chunked LM head):
        assert (grad - trl_grad).norm() <= 1e-4 * trl_grad.norm()  # measured <= 4e-6 relative (discopop 1.5e-5)
    assert max(g.abs().max().item() for g in grads) > 1e-3  # a gradient worth comparing
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name


def test_trl_sigmoid_reads_no_label_smoothing_while_hypo_makes_it_conservative(tiny_tokenizer, tmp_path):
    """The one documented difference: TRL 1.16's sigmoid ignores label_smoothing; hypo's is conservative DPO."""
    items = _items(tiny_tokenizer)
    policy, reference = _models(tiny_tokenizer)
    hypo_models = copy.deepcopy(policy), copy.deepcopy(reference)
    trl_loss, _, _ = _trl_loss_and_grads(policy, reference, tiny_tokenizer, items, "sigmoid",
                                         {"label_smoothing": 0.2}, tmp_path)
    plain, _, _ = _hypo_loss_and_grads(*hypo_models, tiny_tokenizer, items, "sigmoid", {}, True)
    conservative, _, _ = _hypo_loss_and_grads(*hypo_models, tiny_tokenizer, items, "sigmoid",
                                              {"label_smoothing": 0.2}, True)
    torch.testing.assert_close(plain, trl_loss, rtol=1e-5, atol=1e-6)
    assert abs(conservative.item() - trl_loss.item()) > 1e-3


def test_the_batch_exercises_sorting(tiny_tokenizer):
    """aot matches the batch's policy margins and reference margins by rank, aot_unpaired the chosen and rejected
    log-ratios: on a batch where both orders agree, sorting changes nothing and a missing sort would pass."""
    from hypo.objective.logprobs import pair_logps

    batch = PairCollator(tiny_tokenizer.pad_token_id)(_items(tiny_tokenizer))
    policy, reference = _models(tiny_tokenizer)
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, batch, pad_token_id=tiny_tokenizer.pad_token_id, share_prompt=False)
        ref_chosen, ref_rejected = pair_logps(reference, batch, pad_token_id=tiny_tokenizer.pad_token_id,
                                              share_prompt=False)
    assert not torch.equal(torch.argsort(chosen - rejected), torch.argsort(ref_chosen - ref_rejected))
    assert not torch.equal(torch.argsort(chosen - ref_chosen), torch.argsort(rejected - ref_rejected))

"""Model cards and the upload to the Hub (mocked: nothing leaves the machine)."""

from __future__ import annotations

import pytest
import yaml

import hypo.training.hub
from hypo.config import HyPOConfig
from hypo.training.hub import hub_repo_id, push_model, share_trained_model, training_card, write_model_card

EVAL = {"metrics": {"num_prompts": 64, "num_completions": 128, "objective/kl": 0.605, "objective/kl_se": 0.101,
                    "completions/mean_length": 62.1, "completions/mean_length_se": 1.5, "win_rate": 0.555,
                    "win_rate_ci_low": 0.467, "win_rate_ci_high": 0.642, "tie_rate": 0.0},
        "settings": {"judge": "llm:gpt-4o", "baseline": "trl-lib/tldr:completion", "temperature": 1.0, "seed": 42}}
PAIR_METRICS = {"eval_loss": 0.61, "eval_rewards/accuracies": 0.7, "eval_rewards/margins": 0.25}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_of_a_hypo_run_on_hub_data():
    config = HyPOConfig(model_name_or_path="cleanrl/EleutherAI_pythia-2.8b-deduped__sft__tldr",
                        dataset="trl-lib/tldr-preference", eval_dataset="trl-lib/tldr-preference",
                        eval_dataset_split="validation", beta=0.5, kl_coef=0.1)
    text = training_card(config, name="me/pythia-hypo", eval_results=EVAL, pair_metrics=PAIR_METRICS,
                         final_metrics={"loss": 0.5, "objective/kl": 0.9, "time/step": 3.0}).render()
    header = _front_matter(text)
    assert header["base_model"] == "cleanrl/EleutherAI_pythia-2.8b-deduped__sft__tldr"
    assert header["datasets"] == ["trl-lib/tldr-preference"] and "hypo" in header["tags"]
    assert "# me/pythia-hypo" in text and "HyPO (Hybrid Preference Optimization" in text
    assert "- preference pairs: `trl-lib/tldr-preference` (split `train`)" in text
    assert "- unlabeled prompts (online KL term): the prompts of the preference pairs" in text
    assert "- held-out preference pairs: `trl-lib/tldr-preference` (split `validation`)" in text
    assert "| kl_coef | `0.1` |" in text and "| beta | `0.5` |" in text and "lora_r" not in text
    assert "64 prompts, 128 completions" in text and "judge `llm:gpt-4o` against `trl-lib/tldr:completion`" in text
    assert "| win rate vs the baseline (ties count half; 95% CI) | 0.555 [0.467, 0.642] |" in text
    assert "| reverse KL to the reference (nats, k1) | 0.605 ± 0.1 |" in text
    assert "| eval_rewards/accuracies | 0.7 |" in text
    assert "Last training step: loss 0.5, objective/kl 0.9." in text and "time/step" not in text
    assert "transformers " in text and "arXiv:2406.01462" in text


def test_card_of_a_dpo_run_on_local_data(tmp_path):
    config = HyPOConfig(method="dpo", model_name_or_path=str(tmp_path), dataset=str(tmp_path / "pairs.jsonl"),
                        use_peft=True)
    card = training_card(config, name="run")
    header = _front_matter(card.render())
    assert "base_model" not in header and "datasets" not in header  # local paths are no Hub links
    assert "kl_coef" not in card.hyperparameters and card.hyperparameters["lora_r"] == 16
    assert "No evaluation was run." in card.render()
    default = training_card(HyPOConfig(), name="run")
    assert _front_matter(default.render())["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "hypo's bundled task `reviews`" in default.render()


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_uploads_the_model_folder(tmp_path, fake_hub):
    (tmp_path / "config.json").write_text("{}")
    url = push_model(tmp_path, "me/model", private=True, commit_message="msg")
    assert url == "https://huggingface.co/me/model"
    assert fake_hub[1] == ("create_repo", "me/model", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert fake_hub[2] == ("upload_folder", {"repo_id": "me/model", "folder_path": str(tmp_path),
                                             "commit_message": "msg", "repo_type": "model"})
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        push_model(tmp_path / "missing", "me/model")


def test_end_of_training_writes_the_card_and_pushes_only_when_asked(tmp_path, fake_hub):
    model_dir = tmp_path / "runs" / "tldr-hypo" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    config = HyPOConfig(dataset="trl-lib/tldr-preference")
    assert share_trained_model(config, model_dir, output_dir=model_dir.parent, eval_results=EVAL) is None
    assert "# tldr-hypo" in (model_dir / "README.md").read_text() and fake_hub == []
    pushed = HyPOConfig(dataset="trl-lib/tldr-preference", push_to_hub=True, hub_model_id="org/tldr-hypo",
                        hub_private_repo=True)
    assert share_trained_model(pushed, model_dir, output_dir=model_dir.parent) == "https://huggingface.co/org/tldr-hypo"
    assert fake_hub[1][1] == "org/tldr-hypo" and fake_hub[1][2]["private"] is True
    assert fake_hub[2][1]["folder_path"] == str(model_dir)
    assert hub_repo_id(None, tmp_path / "runs" / "dpo-1") == "dpo-1"


def test_card_after_a_real_run(tiny_model_dir, tiny_task, tmp_path):
    from transformers import AutoModelForCausalLM

    from hypo.training.trainer import train

    config = HyPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(tiny_task["pairs"]),
                        prompts=str(tiny_task["prompts"]), eval_prompts=str(tiny_task["eval_prompts"]),
                        judge="review-sentiment", max_steps=1, max_completion_length=4, max_length=48,
                        max_prompt_length=24, per_device_train_batch_size=2, per_device_prompt_batch_size=2,
                        eval_max_prompts=2, output_dir=str(tmp_path / "run"))
    result = train(config)
    share_trained_model(config, result.model_dir, output_dir=result.output_dir, eval_results=result.eval,
                        final_metrics=result.final_metrics)
    text = (result.model_dir / "README.md").read_text()
    assert "2 prompts, 4 completions" in text and "judge `review-sentiment`" in text
    no_judge = {**result.eval, "settings": {**result.eval["settings"], "judge": None}}
    assert "judge `" not in training_card(config, name="x", eval_results=no_judge).render()
    assert AutoModelForCausalLM.from_pretrained(result.model_dir) is not None  # the card changes nothing else
    assert write_model_card(result.model_dir, training_card(config, name="x")).name == "README.md"
    assert hypo.training.hub.METHODS["hypo"].startswith("HyPO")


def test_card_counts_the_whole_batch():
    config = HyPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=-1,
                        num_train_epochs=2.0)
    card = training_card(config, name="x", num_processes=8)
    assert card.hyperparameters["total_train_batch_size"] == 64 and card.hyperparameters["num_train_epochs"] == 2.0
    assert _front_matter(card.render())["tags"] == ["hypo", "preference-optimization"]
    assert "num_train_epochs" not in training_card(HyPOConfig(), name="x").hyperparameters

"""The reward-model judge: scores equal a direct forward of the model on the documented text, batched or
not; win rates come from comparing scores; pairwise judges go through `compare`."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tokenizer
from hypo.evaluation.held_out import judge_rows, summarize
from hypo.evaluation.judges import RewardModelJudge, compare, get_judge


def _save_reward_model(path, tokenizer, chat_template: bool = True):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    saved = build_tokenizer()  # a fresh copy: the session tokenizer keeps its template
    saved.chat_template = saved.chat_template if chat_template else None
    saved.save_pretrained(path)
    return path


def _direct(path, text: str, add_special_tokens: bool) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()


PROMPTS = ["Write a short review of a cafe.", "Write a short review of the movie Northern Lights."]
COMPLETIONS = ["The coffee was excellent.", "A boring, slow and disappointing film. Not good at all, sadly."]


def test_scores_equal_a_direct_forward_with_the_chat_template(tmp_path, tiny_tokenizer):
    path = _save_reward_model(tmp_path / "rm", tiny_tokenizer)
    judge = get_judge(f"rm:{path}")
    assert isinstance(judge, RewardModelJudge) and judge.name == f"rm:{path}"
    assert get_judge(f"rm:{path}") is judge  # loaded once per process
    text = judge.text(PROMPTS[0], COMPLETIONS[0])
    assert text == ("<|im_start|>user\nWrite a short review of a cafe.<|im_end|>\n"
                    "<|im_start|>assistant\nThe coffee was excellent.<|im_end|>\n")
    batched = judge.score_batch(PROMPTS, COMPLETIONS)  # different lengths: padding must not matter
    direct = [_direct(path, judge.text(p, c), add_special_tokens=False) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert batched == pytest.approx(direct, abs=1e-5)
    assert judge.score(PROMPTS[1], COMPLETIONS[1]) == pytest.approx(direct[1], abs=1e-5)
    assert compare(judge, PROMPTS[0], COMPLETIONS[0], COMPLETIONS[0]) == 0.5


def test_without_a_chat_template_the_text_is_prompt_newline_completion(tmp_path, tiny_tokenizer):
    path = _save_reward_model(tmp_path / "rm", tiny_tokenizer, chat_template=False)
    judge = RewardModelJudge(str(path), batch_size=1)
    assert judge.text("p", "c") == "p\nc"
    direct = _direct(path, "p\nc", add_special_tokens=True)
    assert judge.score("p", "c") == pytest.approx(direct, abs=1e-5)


def test_win_rate_from_reward_scores(tmp_path, tiny_tokenizer):
    judge = RewardModelJudge(str(_save_reward_model(tmp_path / "rm", tiny_tokenizer)))
    a, b = judge.score_batch(PROMPTS[:1] * 2, COMPLETIONS)
    rows = [{"prompt_index": 0, "prompt": PROMPTS[0], "policy_text": COMPLETIONS[0], "reference_text": COMPLETIONS[1],
             "k1": 0.0, "k3": 0.0, "policy_length": 3, "policy_eos": True, "reference_length": 3}]
    judge_rows(judge, rows)
    assert rows[0]["policy_score"] == pytest.approx(a) and rows[0]["reference_score"] == pytest.approx(b)
    assert rows[0]["win"] == (1.0 if a > b else 0.0)
    assert summarize(rows, judged=True)["judge/policy_score"] == pytest.approx(a)


def test_pairwise_judges_give_win_rates_without_scores():
    class FirstWins:
        name = "first"

        def compare(self, prompt, completion_a, completion_b):
            return 1.0

    rows = [{"prompt_index": i, "prompt": "p", "policy_text": "a", "reference_text": "b", "k1": 0.0, "k3": 0.0,
             "policy_length": 1, "policy_eos": True, "reference_length": 1} for i in range(2)]
    judge_rows(FirstWins(), rows)
    metrics = summarize(rows, judged=True)
    assert metrics["win_rate"] == 1.0 and "judge/policy_score" not in metrics


def test_rm_judge_needs_a_path():
    with pytest.raises(ValueError, match="rm:"):
        get_judge("rm:")

"""`hypo eval` end to end on tiny models: reproducible with a seed, baselines (a model, or responses in a
dataset), reward-model and LLM judges, and the human-readable eval_report.md."""

from __future__ import annotations

import json

import pytest
from judge_servers import StandInServer, chat
from test_llm_judge import chat_server, running_chat_server  # noqa: F401 (fixtures)
from test_reward_model_judge import _save_reward_model

from conftest import build_model, write_jsonl
from hypo.cli.main import main


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    """A second tiny model (other weights) to serve as reference or baseline."""
    path = tmp_path_factory.mktemp("other-llama")
    build_model(tiny_tokenizer, seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _eval(tiny_model_dir, reference, out, *extra) -> dict:
    argv = ["eval", "--model", str(tiny_model_dir), "--reference", str(reference), "--max-prompts", "3",
            "--num-samples", "2", "--max-new-tokens", "4", "--output-dir", str(out), *map(str, extra)]
    assert main(argv) == 0
    return json.loads((out / "eval_results.json").read_text())


def _samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]


def test_same_seed_same_results_and_a_readable_report(tiny_model_dir, other_model_dir, tiny_task, tmp_path):
    args = ("--prompts", tiny_task["eval_prompts"], "--judge", "review-sentiment", "--seed", "7")
    first = _eval(tiny_model_dir, other_model_dir, tmp_path / "a", *args)
    second = _eval(tiny_model_dir, other_model_dir, tmp_path / "b", *args)
    assert first == second and _samples(tmp_path / "a") == _samples(tmp_path / "b")
    assert first["metrics"]["objective/kl"] != 0  # another reference: the log-ratios are not zero
    settings = first["settings"]
    assert settings["seed"] == 7 and settings["max_new_tokens"] == 4  # the options the command was given
    assert settings["baseline"] == "reference" and settings["judge"] == "review-sentiment"
    report = (tmp_path / "a" / "eval_report.md").read_text()
    m = first["metrics"]
    assert f"| reverse KL to reference, k1 (nats) | {m['objective/kl']:.3f} ± {m['objective/kl_se']:.3f} | 3 prompts |" \
        in report
    assert f"| win rate vs reference [95% CI] | {m['win_rate']:.3f} [" in report and "- seed: `7`" in report
    tempered = _eval(tiny_model_dir, other_model_dir, tmp_path / "t", *args, "--temperature", "0.5")
    assert tempered["settings"]["temperature"] == 0.5  # the judged samples are tempered, the KL samples are not:
    assert tempered["metrics"]["objective/kl"] == first["metrics"]["objective/kl"]
    assert [s["policy_text"] for s in _samples(tmp_path / "t")] != [s["policy_text"] for s in _samples(tmp_path / "a")]
    _eval(tiny_model_dir, other_model_dir, tmp_path / "c", "--prompts", tiny_task["eval_prompts"], "--seed", "8")
    assert _samples(tmp_path / "c") != _samples(tmp_path / "a")


def test_baseline_model(tiny_model_dir, other_model_dir, tiny_task, tmp_path):
    prompts = ("--prompts", tiny_task["eval_prompts"])
    default = _eval(tiny_model_dir, other_model_dir, tmp_path / "default", *prompts)
    # the reference named as the baseline: exactly the default comparison
    same = _eval(tiny_model_dir, other_model_dir, tmp_path / "same", *prompts, "--baseline", other_model_dir)
    assert same["metrics"] == default["metrics"] and same["settings"]["baseline"] == str(other_model_dir)
    assert _samples(tmp_path / "same") == _samples(tmp_path / "default")
    # another baseline changes the compared texts, never the KL to the reference
    other = _eval(tiny_model_dir, other_model_dir, tmp_path / "other", *prompts, "--baseline", tiny_model_dir)
    assert other["metrics"]["objective/kl"] == default["metrics"]["objective/kl"]
    assert [r["reference_text"] for r in _samples(tmp_path / "other")] != \
        [r["reference_text"] for r in _samples(tmp_path / "default")]


def test_baseline_responses_from_a_dataset(tiny_model_dir, tiny_task, tmp_path):
    rows = [json.loads(line) for line in tiny_task["pairs"].read_text().splitlines()]
    results = _eval(tiny_model_dir, tiny_model_dir, tmp_path / "out", "--baseline-dataset", tiny_task["pairs"],
                    "--baseline-field", "rejected", "--judge", "review-sentiment")
    samples = _samples(tmp_path / "out")
    assert [s["reference_text"] for s in samples] == [r["rejected"][0]["content"] for r in rows[:3] for _ in (0, 1)]
    assert [s["prompt"] for s in samples[::2]] == [r["prompt"][0]["content"] for r in rows[:3]]
    assert results["settings"]["baseline"] == f"{tiny_task['pairs']}:rejected"
    assert results["metrics"]["num_prompts"] == 3 and "win_rate" in results["metrics"]
    report = (tmp_path / "out" / "eval_report.md").read_text()
    assert "| win rate vs baseline [95% CI] |" in report and f"Baseline: `{tiny_task['pairs']}:rejected`" in report


def test_baseline_dataset_with_a_missing_field(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Write a review.", "chosen": "Nice."}])
    assert main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--baseline-dataset",
                 str(data), "--baseline-field", "gold", "--output-dir", str(tmp_path / "o")]) == 2
    assert "d.jsonl: row 1: field 'gold'" in capsys.readouterr().err


def test_reward_model_judge(tiny_model_dir, tiny_tokenizer, tiny_task, tmp_path):
    from hypo.evaluation.judges import RewardModelJudge

    rm = _save_reward_model(tmp_path / "rm", tiny_tokenizer)
    results = _eval(tiny_model_dir, tiny_model_dir, tmp_path / "out", "--prompts", tiny_task["eval_prompts"],
                    "--judge", f"rm:{rm}")
    samples = _samples(tmp_path / "out")
    judge = RewardModelJudge(str(rm))
    assert [s["policy_score"] for s in samples] == pytest.approx(
        judge.score_batch([s["prompt"] for s in samples], [s["policy_text"] for s in samples]), abs=1e-5)
    assert results["settings"]["judge"] == f"rm:{rm}" and "judge/policy_score_se" in results["metrics"]


def test_llm_judge_caches_in_the_output_dir_and_never_writes_the_key(
        tiny_model_dir, tiny_task, tmp_path, chat_server, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("JUDGE_KEY", "sk-do-not-write")
    args = ("--prompts", tiny_task["eval_prompts"], "--judge", "llm", "--judge-base-url", chat_server.base_url,
            "--judge-model", "tiny", "--judge-api-key-env", "JUDGE_KEY")
    first = _eval(tiny_model_dir, tiny_model_dir, tmp_path / "out", *args)
    assert len(chat_server.requests) == 6 and chat_server.requests[0]["authorization"] == "Bearer sk-do-not-write"
    assert "LLM win rate vs reference" in capsys.readouterr().out
    second = _eval(tiny_model_dir, tiny_model_dir, tmp_path / "out", *args)
    assert len(chat_server.requests) == 6 and second == first  # resumed from the cache: no new request
    assert first["settings"]["judge"] == "llm:tiny" and "judge/policy_score" not in first["metrics"]
    for path in (tmp_path / "out").iterdir():
        assert "sk-do-not-write" not in path.read_text(), path


def test_llm_judge_options_and_unreachable_endpoint(tiny_model_dir, tiny_task, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--prompts",
            str(tiny_task["eval_prompts"]), "--max-prompts", "1", "--max-new-tokens", "2", "--judge", "llm",
            "--output-dir", str(tmp_path)]
    assert main(base + ["--judge-base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--judge llm needs --judge_base_url and --judge_model" in capsys.readouterr().err
    assert main(base + ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                        "--judge-max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/v1/chat/completions is unreachable after 1 attempts" in err and "Traceback" not in err


def test_judge_timeout_reaches_the_llm_judge(tmp_path):
    from hypo.cli.evaluate import _eval_judge, eval_parser

    args = eval_parser().parse_args(["--model", "m", "--judge", "llm", "--judge_base_url", "http://127.0.0.1:9/v1",
                                     "--judge_model", "x", "--judge_timeout", "7.5"])
    judge = _eval_judge(args, tmp_path, None)
    assert judge.timeout == 7.5 and judge.max_retries == 4 and judge.concurrency == 8 and judge.parse_retries == 2


class UnreadableReplies:
    """A judge that never gives a verdict on the items of `unreadable_prompts` (by prompt text), answers every
    `every`-th request "I cannot decide; both have merits.", and otherwise "A"."""

    def __init__(self, unreadable_prompts=(), every: int = 0):
        self.unreadable_prompts, self.every, self.count = tuple(unreadable_prompts), every, 0

    def __call__(self, messages):
        self.count += 1
        if any(p in messages[0]["content"] for p in self.unreadable_prompts) or \
                (self.every and self.count % self.every == 0):
            return "I cannot decide; both have merits."
        return "A"


def _judged_eval(tiny_model_dir, tiny_task, server, out, *extra):
    argv = ["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--prompts",
            str(tiny_task["eval_prompts"]), "--max_prompts", "4", "--num_samples", "2", "--max_new_tokens", "4",
            "--judge", "llm", "--judge_base_url", server.base_url, "--judge_model", "j", "--output_dir", str(out),
            *map(str, extra)]
    return main(argv)


def test_unreadable_verdicts_are_asked_again_not_counted_as_ties(tiny_model_dir, tiny_task, tmp_path, capsys):
    """Every third reply unreadable: each is asked again and read, so nothing is invalid and no tie appears."""
    server = StandInServer(chat(UnreadableReplies(every=3)))
    try:  # one request at a time: requests 3, 6 and 9 are the unreadable ones
        assert _judged_eval(tiny_model_dir, tiny_task, server, tmp_path / "out", "--judge_concurrency", 1) == 0
    finally:
        server.close()
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    m, settings = results["metrics"], results["settings"]
    assert m["num_invalid"] == 0 and m["tie_rate"] == 0.0 and m["num_completions"] == 8
    assert settings["judge_parse_retries"] == 2 and len(server.requests) == 8 + 3
    assert "LLM judge: 11 requests, 3 replies without a verdict" in capsys.readouterr().out
    assert all(s["win"] in (0.0, 1.0) for s in _samples(tmp_path / "out"))


def test_invalid_judgments_are_reported_and_too_many_withhold_the_win_rate(tiny_model_dir, tiny_task, tmp_path,
                                                                          capsys):
    prompts = [json.loads(line)["prompt"] for line in tiny_task["eval_prompts"].read_text().splitlines()]
    first_prompt = prompts[0] if isinstance(prompts[0], str) else prompts[0][-1]["content"]
    server = StandInServer(chat(UnreadableReplies([first_prompt])))
    out = tmp_path / "out"
    try:
        # 2 of 8 judgments invalid (both samples of the first prompt): 75% valid, below the default 90%
        assert _judged_eval(tiny_model_dir, tiny_task, server, out, "--judge_parse_retries", "1") == 3
        captured = capsys.readouterr()
        assert "win rate withheld: 6 of 8 judgments valid (75%), fewer than the 90% required" in captured.err
        assert "Traceback" not in captured.err
        results = json.loads((out / "eval_results.json").read_text())  # everything else is written
        m = results["metrics"]
        assert m["num_invalid"] == 2 and m["invalid_rate"] == 0.25 and "win_rate" not in m and "tie_rate" not in m
        samples = _samples(out)
        assert [s["win"] for s in samples[:2]] == [None, None] and all(s["win"] == 1.0 or s["win"] == 0.0
                                                                        for s in samples[2:])
        assert samples[0]["judge_reply"] == "I cannot decide; both have merits."
        report = (out / "eval_report.md").read_text()
        assert "| invalid judgments (no readable verdict) | 2 (0.250) | 4 prompts, 8 pairs |" in report
        assert "withheld: too few valid judgments" in report and "**Win rate withheld: 6 of 8" in report
        cached = [json.loads(line)["verdict"] for line in (out / "llm_judge_cache.jsonl").read_text().splitlines()]
        assert sorted(set(cached)) == ["A"] and len(cached) == 6  # invalid judgments are not cached
        asked = len(server.requests)
        # with a lower bar the same judgments give a win rate over the 6 valid ones; the invalid ones are asked again
        assert _judged_eval(tiny_model_dir, tiny_task, server, out, "--judge_parse_retries", "1",
                            "--judge_min_valid_fraction", "0.7") == 0
        assert len(server.requests) == asked + 2 * 2  # 2 invalid items x (1 + 1 parse retry), the rest cached
    finally:
        server.close()
    m = json.loads((out / "eval_results.json").read_text())["metrics"]
    valid = [s for s in _samples(out) if s["win"] is not None]
    per_prompt = {}
    for s in valid:
        per_prompt.setdefault(s["prompt_index"], []).append(s["win"])
    assert m["win_rate"] == pytest.approx(sum(sum(w) / len(w) for w in per_prompt.values()) / 3)
    assert len(per_prompt) == 3 and m["num_invalid"] == 2
    assert "over 6 valid judgments (2 invalid)" in capsys.readouterr().out


def test_judge_concurrency_gives_the_same_results_and_cache(tiny_model_dir, tiny_task, tmp_path):
    server = StandInServer(chat(lambda messages: "AB"[len(messages[0]["content"]) % 2]))
    try:
        for concurrency in (1, 8):
            assert _judged_eval(tiny_model_dir, tiny_task, server, tmp_path / str(concurrency),
                                "--judge_concurrency", concurrency) == 0
    finally:
        server.close()
    one, eight = (json.loads((tmp_path / c / "eval_results.json").read_text()) for c in ("1", "8"))
    assert one["metrics"] == eight["metrics"] and _samples(tmp_path / "1") == _samples(tmp_path / "8")
    assert (tmp_path / "1" / "llm_judge_cache.jsonl").read_bytes() == \
        (tmp_path / "8" / "llm_judge_cache.jsonl").read_bytes()
    assert eight["settings"]["judge_concurrency"] == 8


def test_llm_judge_settings_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    import importlib.util

    from hypo.cli.evaluate import _eval_judge, eval_parser

    llm = ["--model", "m", "--judge", "llm", "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_model", "x"]
    with pytest.raises(ValueError, match=r"--judge_min_valid_fraction must be in \[0, 1\], got 1.5"):
        _eval_judge(eval_parser().parse_args([*llm, "--judge_min_valid_fraction", "1.5"]), tmp_path, None)
    with pytest.raises(ValueError, match="LLM judge concurrency must be an integer >= 1"):
        _eval_judge(eval_parser().parse_args([*llm, "--judge_concurrency", "0"]), tmp_path, None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"--judge llm needs the openai package: pip install 'hypo\[judge\]'"):
        _eval_judge(eval_parser().parse_args(llm), tmp_path, None)

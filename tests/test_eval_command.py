"""`hypo eval` end to end on tiny models: reproducible with a seed, baselines (a model, or responses in a
dataset), reward-model and LLM judges, and the human-readable eval_report.md."""

from __future__ import annotations

import json

import pytest
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
    assert judge.timeout == 7.5 and judge.max_retries == 4

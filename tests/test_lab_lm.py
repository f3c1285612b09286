"""`hypo lab lm`: the grid, the summary across seeds, and a quick end-to-end run on the tiny model
(DPO/HyPO through `hypo train`, RLHF through TRL's RewardTrainer + RLOOTrainer)."""

import json
import math
import statistics

import pytest

from hypo.cli.main import main
from hypo.lab.lm.grid import CENTER, SWEEP, LMLabConfig, LMRun, RunOutcome, run_command, summary_rows


def test_grid_runs_every_seed_at_the_default_setting_and_the_sweep_at_the_first():
    runs = LMLabConfig(seeds=(42, 43, 44)).runs()
    assert len(runs) == 3 * 3 + sum(len(points) for points in SWEEP.values())
    assert len({r.name for r in runs}) == len(runs)
    for method, (beta, kl_coef) in CENTER.items():
        assert sorted(r.seed for r in runs if r.setting == (method, beta, kl_coef)) == [42, 43, 44]
    assert all(r.seed == 42 for r in runs if r.setting[1:] != CENTER[r.method])
    assert [r.method for r in runs[:3]] == ["dpo", "hypo", "rlhf"]  # seed by seed: every method early


def test_run_commands_carry_the_setting(tmp_path):
    config = LMLabConfig()
    hypo = run_command(LMRun("hypo", 0.1, 0.2, 43), config, tmp_path / "h", tmp_path / "rm")
    assert hypo[1:4] == ["-m", "hypo.cli", "train"]
    assert hypo[hypo.index("--kl_coef") + 1] == "0.2" and hypo[hypo.index("--seed") + 1] == "43"
    assert hypo[hypo.index("--eval_steps") + 1] == "10" and hypo[hypo.index("--max_steps") + 1] == "30"
    rlhf = run_command(LMRun("rlhf", 0.0, 0.01, 42), config, tmp_path / "r", tmp_path / "rm")
    assert rlhf[1:5] == ["-m", "hypo.cli", "lab", "rlhf"]
    assert rlhf[rlhf.index("--kl_coef") + 1] == "0.01" and rlhf[rlhf.index("--reward_model_dir") + 1].endswith("rm")
    assert rlhf[rlhf.index("--max_steps") + 1] == "30"  # the same options as the hypo train runs


def _outcome(run, win, kl, seconds):
    metrics = {"win_rate": win, "objective/kl": kl, "objective/kl_k3": kl / 2, "judge/policy_score": win * 2,
               "completions/mean_length": 60.0, "win_rate_ci_low": win - 0.1, "win_rate_ci_high": win + 0.1,
               "objective/kl_se": 0.1}
    return RunOutcome(run, metrics, [(10, kl)], seconds, seconds * 30, final_step=30)


def test_summary_rows_mean_and_sd_across_seeds():
    wins, kls = [0.55, 0.6, 0.62], [0.6, 0.4, 0.5]
    outcomes = [_outcome(LMRun("hypo", 0.1, 0.05, s), w, k, 14.0) for s, w, k in zip((42, 43, 44), wins, kls, strict=True)]
    outcomes.append(_outcome(LMRun("dpo", 0.1, 0.0, 42), 0.5, 1.4, 4.0))
    rows = summary_rows(outcomes)
    assert [r["method"] for r in rows] == ["dpo", "hypo"]
    dpo, hypo = rows
    assert hypo["seeds"] == "42 43 44"
    assert hypo["win_rate"] == pytest.approx(statistics.mean(wins))
    assert hypo["win_rate_sd"] == pytest.approx(statistics.stdev(wins))
    assert hypo["objective/kl_sd"] == pytest.approx(statistics.stdev(kls))
    assert dpo["win_rate"] == 0.5 and math.isnan(dpo["win_rate_sd"])  # one seed: no spread
    assert dpo["kl_coef"] is None and hypo["kl_coef"] == 0.05


def _quick_args(tiny_model_dir, tiny_task, tmp_path, methods):
    return ["lab", "lm", "--quick", "--methods", methods, "--model_name_or_path", str(tiny_model_dir),
            "--dataset", str(tiny_task["pairs"]), "--prompts", str(tiny_task["prompts"]),
            "--eval_prompts", str(tiny_task["eval_prompts"]), "--runs_dir", str(tmp_path / "runs"),
            "--output_dir", str(tmp_path / "out")]


def test_quick_lm_lab_end_to_end_and_resume(tiny_model_dir, tiny_task, tmp_path, capsys):
    args = _quick_args(tiny_model_dir, tiny_task, tmp_path, "hypo")
    assert main(args) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["method"], r["kl_coef"], r["seeds"]) for r in rows] == [
        ("hypo", 0.02, "0"), ("hypo", 0.05, "0 1"), ("hypo", 0.2, "0")]
    for run in ("hypo-beta0.1-kl0.05-s0", "hypo-beta0.1-kl0.05-s1"):
        results = json.loads((out / "runs" / run / "eval_results.json").read_text())
        assert results["settings"]["judge"] == "review-sentiment"
        samples = [json.loads(x) for x in (tmp_path / "runs" / run / "eval_samples.jsonl").read_text().splitlines()]
        per_prompt = [statistics.mean(s["win"] for s in samples if s["prompt_index"] == i) for i in range(4)]
        assert results["metrics"]["win_rate"] == pytest.approx(statistics.mean(per_prompt))
        records = [json.loads(x) for x in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert any("eval_objective/kl" in r and r["step"] == 1 for r in records)  # periodic evaluation
        assert not (tmp_path / "runs" / run / "model").exists()  # models are dropped after evaluation
    center = rows[1]
    per_seed = [json.loads((out / "runs" / f"hypo-beta0.1-kl0.05-s{s}" / "eval_results.json").read_text())
                ["metrics"]["objective/kl"] for s in (0, 1)]
    assert center["objective/kl"] == pytest.approx(statistics.mean(per_seed))
    assert "hypo-beta0.1-kl0.05-s1" in (out / "summary.md").read_text()
    assert (out / "frontier.png").stat().st_size > 0 and (out / "kl_over_training.png").stat().st_size > 0
    assert "--kl_coef 0.2" in (out / "commands.txt").read_text()
    capsys.readouterr()
    assert main(args) == 0  # a second call resumes: every run is kept
    assert capsys.readouterr().out.count("done already, kept") == 4


def test_rlhf_baseline_trains_a_reward_model_then_rloo(tiny_model_dir, tiny_task, tmp_path):
    from hypo.config import HyPOConfig
    from hypo.lab.lm.rlhf import RewardModelConfig, run_rlhf

    config = HyPOConfig(output_dir=str(tmp_path / "rlhf"), model_name_or_path=str(tiny_model_dir), kl_coef=0.1,
                        seed=0, dataset=str(tiny_task["pairs"]), prompts=str(tiny_task["prompts"]),
                        eval_prompts=str(tiny_task["eval_prompts"]), judge="review-sentiment", max_steps=2,
                        eval_steps=1, per_device_prompt_batch_size=2, max_completion_length=8, eval_max_prompts=4,
                        eval_max_prompts_during_training=2)
    results = run_rlhf(config, RewardModelConfig(reward_model_dir=str(tmp_path / "rm")))
    assert (tmp_path / "rm" / "config.json").is_file()
    rm_config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert rm_config["architectures"] == ["LlamaForSequenceClassification"] and len(rm_config["id2label"]) == 1
    assert results["metrics"]["num_completions"] == 8 and results["settings"]["judge"] == "review-sentiment"
    records = [json.loads(x) for x in (tmp_path / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["time/step"] > 0 for r in steps)
    assert [r["step"] for r in records if "eval_objective/kl" in r] == [1, 2]
    assert json.loads((tmp_path / "rlhf" / "config.json").read_text())["reward_model_seconds"] > 0

"""Coverage lab, part 4 (controls): the full-coverage pairs, the label-free selection rules, the hierarchical
paired bootstrap, the t-interval, the preregistered reading, matched-KL interpolation, the tables from run files,
and (slow) the whole pipeline on two tiny worlds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hypo.lab.coverage_controls.analysis import (
    argmin_index,
    hierarchical_bootstrap,
    interpolate_step,
    kl_budget_index,
    pick_within_budget,
    reading,
    t_quantile,
    world_t_interval,
    worst_consistent_win,
)
from hypo.lab.partial_coverage import language as pc

# --- the worlds ---------------------------------------------------------------------------------------------------


def test_full_coverage_pairs_cover_the_reference_lengths_and_partial_pairs_do_not():
    from hypo.lab.coverage_controls.experiment import coverage_pairs

    full, partial = coverage_pairs("full", 10, 4), coverage_pairs("partial", 10, 4)
    assert len(full["pairs"]) == len(partial["pairs"]) == 512
    assert len(full["heldout_pairs"]) == len(partial["heldout_pairs"]) == 512
    full_lengths = np.array([len(r[k].split()) for r in full["pairs"] for k in ("chosen", "rejected")])
    partial_lengths = np.array([len(r[k].split()) for r in partial["pairs"] for k in ("chosen", "rejected")])
    assert ((partial_lengths >= 8) & (partial_lengths <= 12)).all()
    off = ((full_lengths < 8) | (full_lengths > 12)).mean()
    assert 0.12 < off < 0.18  # the reference puts 15% outside [8, 12]
    assert full_lengths.min() >= 4 and full_lengths.max() <= 24 and full_lengths.max() > 12
    # the partial pairs are part 3's (the rows build_world writes for this world seed)
    assert partial["pairs"] == pc.make_pairs(pc.split_prompts(10).pairs, 4, 11)
    # the same prompts in both coverages; labels follow the positive words on every length
    assert [r["prompt"] for r in full["pairs"]] == [r["prompt"] for r in partial["pairs"]]
    chosen_base = np.mean([pc.base_score(r["chosen"]) for r in full["pairs"]])
    rejected_base = np.mean([pc.base_score(r["rejected"]) for r in full["pairs"]])
    assert chosen_base > rejected_base + 0.5
    with pytest.raises(ValueError, match="coverage"):
        coverage_pairs("half", 10, 4)


def test_only_the_ignore_world_agrees_with_full_coverage_labels():
    long_text = " ".join(["great"] * 14)  # 2 words beyond 12
    assert pc.gold_score(long_text, "ignore") == pc.base_score(long_text)
    assert pc.gold_score(long_text, "penalize") != pc.base_score(long_text)
    assert worst_consistent_win({"penalize": 0.2, "ignore": 0.9, "reward": 0.95}, "partial") == 0.2
    assert worst_consistent_win({"penalize": 0.2, "ignore": 0.9, "reward": 0.95}, "full") == 0.9


def test_setting_names_and_the_default_grid():
    from hypo.lab.coverage_controls.experiment import (
        DEFAULT_SETTINGS,
        CoverageControlsConfig,
        Setting,
        run_name,
    )

    assert [s.name for s in DEFAULT_SETTINGS] == [
        "dpo-b0.1", "dpo-b0.3", "dpo-b1", "dpo-b0.1-linear",
        "hypo-kl0.01", "hypo-kl0.001", "hypo-kl0.0001", "hypo-kl1e-05"]
    assert sum(s.method == "dpo" for s in DEFAULT_SETTINGS) == sum(s.method == "hypo" for s in DEFAULT_SETTINGS)
    assert Setting("hypo", beta=0.3, kl_coef=0.01).name == "hypo-kl0.01-b0.3"
    config = CoverageControlsConfig()
    assert (config.max_steps, config.save_steps) == (256, 32)
    assert len(config.cells()) == 5 * 3 * 2 and config.cells()[:2] == [(10, 1, "partial"), (10, 1, "full")]
    assert run_name(10, "full", 2, DEFAULT_SETTINGS[3]) == "w10-full-s2-dpo-b0.1-linear"


def test_run_order_puts_the_primary_settings_first():
    from hypo.lab.coverage_controls.experiment import CoverageControlsConfig, run_order

    order = run_order(CoverageControlsConfig())
    assert len(order) == 30 + 15 + 15
    assert order[0] == (10, 1, "partial", ["dpo-b0.1", "hypo-kl0.01"])
    assert order[5] == (10, 3, "full", ["dpo-b0.1", "hypo-kl0.01"]) and order[6][0] == 20
    assert {c for _, _, c, _ in order[30:45]} == {"partial"} and {c for _, _, c, _ in order[45:]} == {"full"}
    assert order[30][3] == ["dpo-b0.3", "dpo-b1", "dpo-b0.1-linear", "hypo-kl0.001", "hypo-kl0.0001", "hypo-kl1e-05"]
    assert sum(len(names) for *_, names in order) == 240  # every run once
    assert run_order(CoverageControlsConfig.quick()) == [(10, 1, "partial", ["dpo-b0.1", "hypo-kl0.01"]),
                                                          (10, 1, "full", ["dpo-b0.1", "hypo-kl0.01"]),
                                                          (20, 1, "partial", ["dpo-b0.1", "hypo-kl0.01"]),
                                                          (20, 1, "full", ["dpo-b0.1", "hypo-kl0.01"])]


def test_train_config_carries_the_setting(tmp_path):
    from hypo.lab.coverage_controls.experiment import CoverageControlsConfig, Setting, train_config

    config = CoverageControlsConfig()
    dpo = train_config(Setting("dpo", beta=0.3, lr_scheduler_type="linear"), 2, config, tmp_path, tmp_path / "r")
    assert (dpo.method, dpo.beta, dpo.kl_coef, dpo.lr_scheduler_type, dpo.seed) == ("dpo", 0.3, 0.0, "linear", 2)
    hypo = train_config(Setting("hypo", kl_coef=0.001), 1, config, tmp_path, tmp_path / "r")
    assert (hypo.kl_coef, hypo.lr_scheduler_type, hypo.max_steps, hypo.save_steps) == (
        0.001, "constant_with_warmup", 256, 32)
    assert hypo.dataset == str(tmp_path / "pairs.jsonl") and hypo.num_threads == 1


def test_config_round_trips_through_its_dict():
    from hypo.lab.coverage_controls.experiment import CoverageControlsConfig, config_from_dict, config_to_dict

    config = CoverageControlsConfig.quick()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_heldout_pair_metrics_by_hand():
    from hypo.lab.coverage_controls.experiment import heldout_pair_metrics

    # margins: (-1 - 0) - (-3 - 0) = 2 and (-2 - -2) - (-1 - -1) = 0
    policy = {"chosen": [-1.0, -2.0], "rejected": [-3.0, -1.0]}
    ref = {"chosen": [0.0, -2.0], "rejected": [0.0, -1.0]}
    out = heldout_pair_metrics(policy, ref, beta=0.5)
    assert out["loss"] == pytest.approx((math.log(2) + math.log1p(math.exp(-1))) / 2)  # 0.5032
    assert out["loss"] == pytest.approx(0.5032, abs=1e-4)
    assert out["loss_beta_0.1"] == pytest.approx((math.log(2) + math.log1p(math.exp(-0.2))) / 2)
    assert (out["accuracy"], out["margin"], out["pairs"]) == (0.75, 1.0, 2)
    far = heldout_pair_metrics({"chosen": [-1000.0], "rejected": [0.0]}, {"chosen": [0.0], "rejected": [0.0]}, 1.0)
    assert far["loss"] == pytest.approx(1000.0) and far["accuracy"] == 0.0  # no overflow


# --- label-free selection -----------------------------------------------------------------------------------------


def test_kl_budget_stops_before_the_first_evaluation_over_budget():
    assert kl_budget_index([0, 1, 3, 6, 4], 5) == 2  # stops at the 6; never sees the 4
    assert kl_budget_index([0, 1, 3, 6, 4], 7) == 4
    assert kl_budget_index([0, 9, 3], 5) == 0  # the reference when the first checkpoint is over budget
    assert kl_budget_index([0, 1, 5.0], 5) == 2  # within means <=
    # part 3's DPO mean trajectory (KL 0.16 ... 4.1 at step 128, 17.8 at 160) with budget 4.3 -> step 128
    steps = [0, 32, 64, 96, 128, 160, 192, 224, 256]
    assert steps[kl_budget_index([0, 0.16, 0.77, 1.7, 4.1, 17.8, 228, 300, 321], 4.3)] == 128


def test_best_heldout_loss_checkpoint_skips_the_reference():
    assert argmin_index([0.69, 0.5, 0.4, 0.4, 0.6], start=1) == 2  # first of the ties
    assert argmin_index([0.1, 0.5, 0.4], start=1) == 2
    assert argmin_index([0.3, 0.5, 0.4]) == 0


def test_pick_within_budget_spends_the_budget():
    kls = [[0, 2, 9], [0, 1, 3]]
    assert pick_within_budget(kls, 5) == (1, 2)  # setting 0 stops at KL 2 (its 9 is over budget); 3 > 2
    assert pick_within_budget(kls, 10) == (0, 2)
    assert pick_within_budget([[0, 1, 2], [0, 2, 6]], 5) == (0, 2)  # tie at KL 2: the earlier setting
    assert pick_within_budget([[0, 6]], 5) == (0, 0)  # nothing trained within budget: the reference


# --- intervals ----------------------------------------------------------------------------------------------------


def test_hierarchical_bootstrap_by_hand():
    # worlds constant within: every replicate is the mean of 2 world values drawn from {1, 3}: 1, 2 or 3 with
    # probabilities 1/4, 1/2, 1/4 -> interval [1, 3], se sqrt(1 / 2)
    out = hierarchical_bootstrap(np.array([[1.0, 1.0], [3.0, 3.0]]), replicates=4000)
    assert out["estimate"] == 2.0 and (out["low"], out["high"]) == (1.0, 3.0)
    assert out["se"] == pytest.approx(math.sqrt(0.5), rel=0.05)
    assert (out["worlds"], out["runs"]) == (2, 4)
    # a paired shift with no noise: a degenerate interval
    rng = np.random.default_rng(0)
    b = rng.uniform(size=(5, 3))
    shift = hierarchical_bootstrap((b + 0.1) - b, replicates=500)
    assert shift["low"] == pytest.approx(0.1) and shift["high"] == pytest.approx(0.1)
    # one world: only the seeds vary; seeds 0 and 2 -> replicates 0, 1, 2 with probabilities 1/4, 1/2, 1/4
    one = hierarchical_bootstrap(np.array([[0.0, 2.0]]), replicates=4000)
    assert (one["low"], one["high"]) == (0.0, 2.0)
    # NaN cells are left out, and worlds weigh equally: world means 1 and (4 + 6) / 2 = 5 -> 3
    assert hierarchical_bootstrap(np.array([[1.0, np.nan], [4.0, 6.0]]), replicates=100)["estimate"] == 3.0
    assert hierarchical_bootstrap(np.full((2, 2), np.nan))["worlds"] == 0
    # the same seed gives the same interval
    noisy = rng.normal(size=(5, 3))
    assert hierarchical_bootstrap(noisy, seed=3) == hierarchical_bootstrap(noisy, seed=3)


def test_hierarchical_bootstrap_se_matches_the_world_level_se_when_worlds_dominate():
    """World effects sd 1, no seed noise, 40 worlds: the se of the mean is about 1 / sqrt(40) (times
    sqrt((W - 1) / W), the bootstrap's known shrinkage)."""
    rng = np.random.default_rng(1)
    values = np.repeat(rng.normal(size=(40, 1)), 3, axis=1)
    out = hierarchical_bootstrap(values, replicates=4000)
    expected = values[:, 0].std(ddof=0) / math.sqrt(40)
    assert out["se"] == pytest.approx(expected, rel=0.08)


def test_t_interval_over_world_means():
    assert t_quantile(4) == 2.776 and t_quantile(30) == pytest.approx(2.042, abs=2e-3)
    out = world_t_interval(np.array([[1.0, 1.0], [2.0, np.nan], [3.0, 3.0]]))
    half = 4.303 * 1.0 / math.sqrt(3)
    assert out["estimate"] == 2.0
    assert (out["low"], out["high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))  # [-0.484, 4.484]
    assert math.isnan(world_t_interval(np.array([[1.0, 2.0]]))["low"])


def test_reading_of_an_interval():
    assert reading(0.01, 0.02) == "HyPO ahead (by less than 0.03)"
    assert reading(0.01, 0.2) == "HyPO ahead"
    assert reading(-0.02, 0.01) == "equivalent within 0.03"
    assert reading(-0.05, 0.01) == "not resolved"
    assert reading(-0.2, -0.1) == "DPO ahead"
    assert reading(-0.02, -0.01) == "DPO ahead (by less than 0.03)"
    assert reading(float("nan"), 0.1) == "no data"


def test_interpolated_step_at_a_kl_level():
    assert interpolate_step([0, 32, 64], [0, 2, 12], 10) == pytest.approx(57.6)
    assert math.isnan(interpolate_step([0, 32, 64], [0, 2, 3], 10))


# --- the tables from run files ------------------------------------------------------------------------------------


def _evaluation(step, kl, wins, off=0.1, accuracy=0.6, loss=0.6):
    worlds = {w: {"score": [0.0, 0.1], "reference_score": 0.0, "win_rate": [wins[i], 0.01]}
              for i, w in enumerate(pc.WORLDS)}
    return {"step": step, "kl": [kl, 0.1], "kl_k3": [kl, 0.1], "off_range": [off, 0.01], "eos_rate": 1.0,
            "long_rate": 0.0, "short_rate": 0.0, "mean_length_words": 10.0, "positive_rate": 0.3, "worlds": worlds,
            "drift": {}, "heldout": {"loss": loss, "accuracy": accuracy}}


def _write_run(out, world, seed, coverage, method, beta, kl_coef, checkpoints):
    from hypo.lab.coverage_controls.experiment import Setting, run_name

    setting = Setting(method, beta=beta, kl_coef=kl_coef)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run_name(world, coverage, seed, setting)}.json").write_text(json.dumps(
        {"world_seed": world, "coverage": coverage, "seed": seed,
         "setting": {"method": method, "beta": beta, "kl_coef": kl_coef, "lr_scheduler_type": "constant_with_warmup",
                     "name": setting.name}, "checkpoints": checkpoints}))


def test_report_from_run_files(tmp_path):
    """Two worlds x two seeds, partial coverage. HyPO ends at KL 4 (the budget) with wins (0.8, 0.9, 0.9); DPO
    passes KL 3 at step 32 (wins 0.7, 0.8, 0.8), 8 at step 64 (0.2, 0.9, 0.99). DPO at the budget stops at step 32:
    primary = 0.8 - 0.7 = +0.1 in every run; at the final step HyPO - DPO = 0.8 - 0.2 = 0.6."""
    from hypo.lab.coverage_controls.report import write_report

    (tmp_path / "reference").mkdir()
    for world in (10, 20):
        (tmp_path / "reference" / f"w{world}-partial.json").write_text(json.dumps(
            {"world_seed": world, "coverage": "partial", **_evaluation(0, 0.0, [0.5, 0.5, 0.5], loss=math.log(2),
                                                                       accuracy=0.5)}))
        for seed in (1, 2):
            _write_run(tmp_path, world, seed, "partial", "dpo", 0.1, 0.0,
                       [_evaluation(32, 3.0, [0.7, 0.8, 0.8], accuracy=0.7, loss=0.5),
                        _evaluation(64, 8.0, [0.2, 0.9, 0.99], off=0.9, accuracy=0.8, loss=0.55)])
            _write_run(tmp_path, world, seed, "partial", "hypo", 0.1, 0.01,
                       [_evaluation(32, 2.0, [0.7, 0.7, 0.7], accuracy=0.6),
                        _evaluation(64, 4.0, [0.8, 0.9, 0.9], accuracy=0.7)])
    summary = write_report(tmp_path, plots=False)
    assert summary["runs"] == 8 and summary["coverages"] == ["partial"]
    primary = summary["primary"]["worst"]["partial"]
    assert primary["estimate"] == pytest.approx(0.1) and primary["low"] == pytest.approx(0.1)
    assert primary["reading"] == "HyPO ahead"
    recipes = {(r["setting"], r["rule"]): r for r in summary["recipes"]["partial"]}
    assert recipes[("dpo-b0.1", "final")]["primary_hypo_minus_this"]["estimate"] == pytest.approx(0.6)
    assert recipes[("dpo-b0.1", "kl_budget")]["step"] == 32
    assert recipes[("dpo-b0.1", "heldout_loss")]["step"] == 32  # loss 0.5 < 0.55
    tuned = summary["tuned"]["partial"]
    # label-free: DPO keeps step 32 only (step 64 is over the budget): 0.7; HyPO spends its budget at step 64: 0.8
    assert tuned["label_free"]["dpo"]["estimate"] == pytest.approx(0.7)
    assert tuned["label_free"]["hypo"]["estimate"] == pytest.approx(0.8)
    assert tuned["oracle"]["dpo"]["rule"] in ("kl_budget", "heldout_loss")
    # matched KL at 3 nats: DPO at step 32 (0.7), HyPO halfway from step 32 (0.7) to 64 (0.8) -> 0.75
    at3 = next(r for r in summary["matched_kl"]["partial"] if r["level"] == 3.0)
    assert at3["pairs"] == 4 and at3["worst"]["estimate"] == pytest.approx(0.05)
    assert next(r for r in summary["matched_kl"]["partial"] if r["level"] == 10.0)["pairs"] == 0
    # DPO reaches 10 nats never (it ends at 8)
    assert summary["break_away"]["dpo-b0.1"]["partial"]["reached"] == 0
    assert summary["break_away"]["dpo-b0.1"]["partial"]["final_kl_median"] == pytest.approx(8.0)
    assert summary["break_away"]["hypo-kl0.01"]["partial"]["runs"] == 4
    text = (tmp_path / "summary.md").read_text()
    assert "## Primary endpoint" in text
    # the recipes' last column is hypo-kl0.01 - this recipe: its reading names them, not the methods
    assert "| dpo-b0.1 | final | 0.200 [0.200, 0.200] |" in text
    assert "| +0.600 [+0.600, +0.600] | hypo-kl0.01 ahead |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["runs"] == 8


def test_break_away_counts_every_setting_under_each_coverage(tmp_path):
    """DPO beta 0.1 passes 10 nats between steps 32 and 64 (KL 2 -> 12: at step 57.6) in world 10 only, under
    partial coverage; under full coverage it never does. DPO beta 0.3 stays at 5 nats. The table has a row per
    setting and coverage, and the paired partial - full line for beta 0.1."""
    from hypo.lab.coverage_controls.report import write_report

    (tmp_path / "reference").mkdir()
    for coverage in ("partial", "full"):
        for world in (10, 20):
            (tmp_path / "reference" / f"w{world}-{coverage}.json").write_text(json.dumps(
                {"world_seed": world, "coverage": coverage, **_evaluation(0, 0.0, [0.5, 0.5, 0.5], loss=math.log(2),
                                                                           accuracy=0.5)}))
            far = 12.0 if (coverage, world) == ("partial", 10) else 6.0
            _write_run(tmp_path, world, 1, coverage, "dpo", 0.1, 0.0,
                       [_evaluation(32, 2.0, [0.7, 0.8, 0.8]), _evaluation(64, far, [0.6, 0.9, 0.9])])
            _write_run(tmp_path, world, 1, coverage, "dpo", 0.3, 0.0,
                       [_evaluation(32, 2.0, [0.7, 0.8, 0.8]), _evaluation(64, 5.0, [0.8, 0.9, 0.9])])
            _write_run(tmp_path, world, 1, coverage, "hypo", 0.1, 0.01,
                       [_evaluation(32, 2.0, [0.7, 0.7, 0.7]), _evaluation(64, 4.0, [0.8, 0.9, 0.9])])
    summary = write_report(tmp_path, plots=False)
    beta01 = summary["break_away"]["dpo-b0.1"]
    assert list(summary["break_away"]) == ["dpo-b0.1", "dpo-b0.3", "hypo-kl0.01"]
    assert (beta01["partial"]["reached"], beta01["full"]["reached"]) == (1, 0)
    assert beta01["partial"]["step"]["estimate"] == pytest.approx(57.6)
    assert beta01["partial"]["final_kl_range"] == [6.0, 12.0] and beta01["partial"]["final_kl_over_100"] == 0
    assert beta01["partial_minus_full"]["final_kl"]["estimate"] == pytest.approx(3.0)  # (6 + 0) / 2 worlds
    assert summary["break_away"]["dpo-b0.3"]["full"]["reached"] == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| dpo-b0.1 | partial | 1 of 2 | 58 | 9.0 / 9.0 (6.0-12.0) |" in text
    assert "| dpo-b0.3 | full | 0 of 2 | - | 5.0 / 5.0 (5.0-5.0) |" in text
    assert "dpo-b0.1, partial - full, paired: step" in text
    # equal tuning: DPO's pick spends most of HyPO's budget (4): beta 0.1 at step 32 (KL 2; its step 64 is over),
    # beta 0.3 at step 32 too (5 > 4): worst 0.7 (partial) and 0.8 (full: the ignore world); HyPO, ending at 4, 0.8
    # and 0.9. HyPO - DPO +0.1 under both: interaction 0
    tuned = summary["tuned"]
    assert tuned["full"]["label_free"]["dpo_settings"] == ["dpo-b0.1", "dpo-b0.3"]
    assert tuned["full"]["label_free"]["diff"]["estimate"] == pytest.approx(0.1)
    assert tuned["partial - full"]["label_free"]["estimate"] == pytest.approx(0.0)
    assert "| partial | label-free over 1 + 2 settings" in text
    assert "| partial - full (interaction; not preregistered) | label-free | | | +0.000 [+0.000, +0.000] |" in text


# --- the whole pipeline on tiny worlds ----------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_grid_end_to_end_resumes_and_reproduces(tmp_path):
    """`hypo lab coverage-controls --quick`: two tiny worlds, both coverages, DPO and HyPO with 2 steps each through
    the real trainer; a second call finds every run done, and a run rerun alone gives the same bytes."""
    from hypo.cli.main import main

    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    args = ["lab", "coverage-controls", "--quick", "--runs_dir", str(runs_dir), "--output_dir", str(out)]
    assert main(args) == 0
    names = sorted(p.stem for p in (out / "runs").glob("*.json"))
    assert len(names) == 2 * 2 * 2 and "w10-full-s1-hypo-kl0.01" in names
    result = json.loads((out / "runs" / "w20-partial-s1-dpo-b0.1.json").read_text())
    assert [c["step"] for c in result["checkpoints"]] == [1, 2]
    assert result["checkpoints"][-1]["kl"][0] > 0 and "per_prompt" not in result["checkpoints"][0]
    assert 0 <= result["checkpoints"][-1]["heldout"]["accuracy"] <= 1
    coverage = json.loads((runs_dir / "w10" / "full" / "coverage.json").read_text())
    assert coverage["pairs"]["off_range"] > 0.05
    summary = (out / "summary.md").read_text()
    assert "## Primary endpoint" in summary and (out / "curves.png").stat().st_size > 0
    before = (out / "runs" / "w10-full-s1-dpo-b0.1.json").read_bytes()
    summary_json = (out / "summary.json").read_bytes()
    (out / "runs" / "w10-full-s1-dpo-b0.1.json").unlink()
    assert main(args) == 0  # resumes: only the deleted run is trained again
    assert (out / "runs" / "w10-full-s1-dpo-b0.1.json").read_bytes() == before
    assert (out / "summary.json").read_bytes() == summary_json
    timings = [json.loads(line)["run"] for line in (out / "timings.jsonl").read_text().splitlines()]
    assert len(timings) == 9 and timings[-1] == "w10-full-s1-dpo-b0.1"

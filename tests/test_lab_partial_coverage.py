"""The partial-coverage lab: the synthetic language and its gold worlds, the pure analysis (matched-KL
interpolation, worst case, paired bootstrap), the scoring of evaluation rows, and the tables."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from hypo.lab.partial_coverage import language as pc
from hypo.lab.partial_coverage.analysis import (
    first_crossing,
    interpolate_at_kl,
    minimum_detectable_difference,
    paired_bootstrap,
    worst_case,
)

# --- the language and its worlds ----------------------------------------------------------------------------


def test_worlds_agree_on_every_pair_and_differ_off_range():
    pairs = pc.make_pairs(pc.split_prompts(0).pairs, 4, seed=1)
    assert len(pairs) == 512
    for row in pairs:
        for text in (row["chosen"], row["rejected"]):
            assert pc.RANGE[0] <= len(text.split()) <= pc.RANGE[1]
            scores = {pc.gold_score(text, w) for w in pc.WORLDS}
            assert scores == {pc.base_score(text)}
    long_text = " ".join(["great"] * 15)  # 3 words beyond 12
    assert [pc.gold_score(long_text, w) for w in ("penalize", "ignore", "reward")] == [15 - 4.5, 15, 15 + 3]
    short_text = "great is"  # 6 words short of 8
    assert [pc.gold_score(short_text, w) for w in ("penalize", "ignore", "reward")] == [1 - 9, 1, 1 + 6]


def test_off_range_counts_clipped_samples():
    in_range = " ".join(["is"] * 10)
    assert not pc.is_off_range(in_range)
    assert pc.is_off_range(in_range, clipped=True)
    assert pc.is_off_range(" ".join(["is"] * 13)) and pc.is_off_range(" ".join(["is"] * 7))


def test_prompt_split_is_disjoint_and_seeded():
    split = pc.split_prompts(0)
    sets = [set(split.pairs), set(split.unlabeled), set(split.eval)]
    assert [len(s) for s in sets] == [128, 64, 128]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert pc.split_prompts(0) == split and pc.split_prompts(1) != split


def test_reference_distribution_matches_its_specification():
    rng = random.Random(0)
    texts = [pc.sample_response(rng) for _ in range(20000)]
    lengths = np.array([len(t.split()) for t in texts])
    assert abs(((lengths >= 8) & (lengths <= 12)).mean() - 0.85) < 0.01
    assert lengths.min() >= 4 and lengths.max() <= 24
    rate = sum(pc.base_score(t) for t in texts) / lengths.sum()
    assert abs(rate - 0.25) < 0.01  # Beta(2, 6) has mean 0.25
    assert set(" ".join(texts).split()) <= set(pc.POSITIVE) | set(pc.NEUTRAL)


def test_word_level_tokenizer_round_trips():
    from hypo.lab.partial_coverage.world import build_tokenizer

    tokenizer = build_tokenizer()
    text = "great is very lovely"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0


# --- analysis -------------------------------------------------------------------------------------------------


def test_first_crossing_and_interpolation():
    assert first_crossing([0, 1, 3], 2) == (1, 0.5)
    assert first_crossing([0, 1, 3], 1) == (0, 1.0)
    assert first_crossing([0, 1, 3], 4) is None
    assert first_crossing([0, 2, 1, 3], 1.5) == (0, 0.75)  # the first crossing, not a later one
    np.testing.assert_allclose(interpolate_at_kl([0, 1, 3], [[0, 10], [2, 20], [6, 40]], 2), [4, 30])
    assert interpolate_at_kl([0, 1], [[0], [1]], 5) is None


def test_worst_case_is_the_lowest_world_mean():
    assert worst_case([[0.6, 0.8], [0.2, 0.4]]) == pytest.approx(0.3)
    assert worst_case(np.ones((3, 2, 5)) * np.array([0.5, 0.1, 0.9])[:, None, None]) == pytest.approx(0.1)


def test_paired_bootstrap_on_known_inputs():
    rng = np.random.default_rng(0)
    b = rng.uniform(size=(8, 128))
    shifted = paired_bootstrap(b + 0.1, b, replicates=200)
    assert shifted["estimate"] == pytest.approx(0.1)
    assert shifted["low"] == pytest.approx(0.1) and shifted["high"] == pytest.approx(0.1)  # paired: no noise
    # independent noise with sd 0.3 per (seed, prompt): the se of the mean difference is 0.3 / sqrt(1024);
    # resampling seeds and prompts both counts cell-level noise about twice in the variance's terms
    # ((2S - 1) / S^2 * (2P - 1) / P^2 ~ 4 / (SP)): conservative, se about 2x
    noisy = paired_bootstrap(b + 0.05 + rng.normal(0, 0.3, size=b.shape), b, replicates=500)
    assert noisy["low"] < 0.05 < noisy["high"]
    iid_se = 0.3 / np.sqrt(1024)
    assert 1.5 * iid_se < noisy["se"] < 2.3 * iid_se
    # worst case: a's worst world is 0.2, b's is 0.4
    a3 = np.stack([np.full((4, 16), 0.2), np.full((4, 16), 0.9)])
    b3 = np.stack([np.full((4, 16), 0.6), np.full((4, 16), 0.4)])
    assert paired_bootstrap(a3, b3, replicates=50, worst=True)["estimate"] == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="unpaired"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))


def test_minimum_detectable_difference():
    assert minimum_detectable_difference(0.02) == pytest.approx(0.056, abs=1e-3)


# --- scoring evaluation rows ----------------------------------------------------------------------------------


def _row(prompt_index, policy, reference, eos=True, k1=0.5):
    return {"prompt_index": prompt_index, "policy_text": policy, "reference_text": reference, "k1": k1, "k3": k1 / 2,
            "policy_eos": eos, "policy_length": len(policy.split()) + eos}


def test_score_samples_per_world():
    from hypo.lab.partial_coverage.experiment import score_samples

    in_range = "great great is is is is is is"  # 8 words, base 2
    long = "great great great is is is is is is is is is is is"  # 14 words, base 3, 2 outside
    ref = "great is is is is is is is"  # 8 words, base 1
    rows = [_row(0, in_range, ref), _row(0, long, ref), _row(1, "great " * 3 + "is " * 7, ref, eos=False)]
    scored = score_samples(rows, max_new_tokens=40)
    assert scored["per_prompt"]["off_range"] == [0.5, 1.0]  # the clipped sample is off range
    # penalize: long -> 3 - 3 = 0 < 1 (loss); in_range 2 > 1 (win) -> prompt 0 win 0.5
    assert scored["per_prompt"]["penalize"]["win"][0] == 0.5
    assert scored["per_prompt"]["reward"]["win"][0] == 1.0
    assert scored["per_prompt"]["ignore"]["score"][0] == 2.5
    assert scored["kl"][0] == pytest.approx(0.5) and scored["eos_rate"] == pytest.approx(0.5)  # mean over prompts of 1 and 0
    tie = score_samples([_row(0, ref, ref)], 40)
    assert tie["worlds"]["penalize"]["win_rate"][0] == 0.5


def test_gate():
    from hypo.lab.partial_coverage.experiment import gate_passed

    reference = {"off_range": [0.15, 0.01]}
    run = {"checkpoints": [{"off_range": [0.2, 0.01]}, {"off_range": [0.26, 0.01]}]}
    assert gate_passed(reference, run) == (True, pytest.approx(0.11))
    run["checkpoints"][1]["off_range"][0] = 0.24
    assert gate_passed(reference, run)[0] is False


# --- the tables from run files --------------------------------------------------------------------------------


def _evaluation(step, kl, wins, prompts=6):
    worlds = {w: {"score": [wins[i], 0.1], "reference_score": 0.0, "win_rate": [wins[i], 0.01]}
              for i, w in enumerate(pc.WORLDS)}
    per_prompt = {"kl": [kl] * prompts, "off_range": [0.2] * prompts,
                  **{w: {"score": [wins[i]] * prompts, "win": [wins[i]] * prompts} for i, w in enumerate(pc.WORLDS)}}
    drift = {s: {"chosen": -1.0, "rejected": -2.0, "accuracy": 0.6} for s in ("train", "heldout")}
    return {"step": step, "epoch": step / 64, "kl": [kl, 0.1], "kl_k3": [kl, 0.1], "off_range": [0.2, 0.01],
            "eos_rate": 1.0, "long_rate": 0.1, "short_rate": 0.1, "mean_length_words": 10.0, "positive_rate": 0.3,
            "worlds": worlds, "per_prompt": per_prompt, "drift": drift}


def test_report_from_run_files(tmp_path):
    from hypo.lab.partial_coverage.report import write_report

    (tmp_path / "runs").mkdir()
    (tmp_path / "reference.json").write_text(json.dumps(_evaluation(0, 0.0, [0.5, 0.5, 0.5])))
    for seed in (1, 2, 3):
        # DPO: KL 2 then 4, win in penalize falls; HyPO: KL 1 then 2, win stays
        dpo = [_evaluation(32, 2.0, [0.6, 0.7, 0.8]), _evaluation(64, 4.0, [0.3, 0.8, 0.9])]
        hypo = [_evaluation(32, 1.0, [0.6, 0.6, 0.6]), _evaluation(64, 2.0, [0.7, 0.7, 0.7])]
        for method, kl_coef, checkpoints in (("dpo", 0.0, dpo), ("hypo", 0.5, hypo)):
            name = "dpo" if method == "dpo" else "hypo-kl0.5"
            (tmp_path / "runs" / f"{name}-s{seed}.json").write_text(json.dumps(
                {"run": {"method": method, "kl_coef": kl_coef, "seed": seed}, "checkpoints": checkpoints}))
    summary = write_report(tmp_path)
    final = summary["equal_steps"]["hypo-kl0.5"][64]
    assert final["penalize"]["estimate"] == pytest.approx(-0.4)
    assert final["worst"]["estimate"] == pytest.approx(0.3 - 0.7)
    # matched KL: the largest KL every run reaches is 2 (HyPO's); at KL 2 DPO is at step 32 (win 0.6, 0.7, 0.8)
    # and HyPO at step 64 (0.7 each)
    top = summary["matched_kl"]["hypo-kl0.5"][-1]
    assert top["kl"] == pytest.approx(2.0)
    assert top["dpo_mean"] == pytest.approx([0.6, 0.7, 0.8]) and top["hypo_mean"] == pytest.approx([0.7, 0.7, 0.7])
    assert top["diff"]["worst"]["estimate"] == pytest.approx(-0.1)
    # at KL 1 (half): DPO halfway from the reference (0.5) to step 32 (0.6 / 0.7 / 0.8)
    assert summary["matched_kl"]["hypo-kl0.5"][1]["dpo_mean"] == pytest.approx([0.55, 0.6, 0.65])
    assert "| 64 |" in (tmp_path / "summary.md").read_text()


# --- the grid: resuming, the gate, and one tiny end-to-end run ---------------------------------------------


def _fake_run(method, kl_coef, seed, off_range):
    checkpoints = [_evaluation(32, 1.0, [0.6, 0.6, 0.6]), _evaluation(64, 2.0, [0.7, 0.7, 0.7])]
    for c in checkpoints:
        c["off_range"] = [off_range, 0.01]
    return {"run": {"method": method, "kl_coef": kl_coef, "seed": seed}, "checkpoints": checkpoints}


@pytest.mark.parametrize("dpo_off_range, runs_kept", [(0.5, 4), (0.2, 4)])
def test_finished_runs_are_skipped_and_the_gate_stops_the_grid(tmp_path, dpo_off_range, runs_kept, capsys):
    from hypo.lab.partial_coverage.experiment import PartialCoverageConfig, run_partial_coverage_lab

    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    (runs_dir / "world").mkdir(parents=True)
    (runs_dir / "world" / "world.json").write_text("{}")
    (out / "runs").mkdir(parents=True)
    (out / "reference.json").write_text(json.dumps(_evaluation(0, 0.0, [0.5, 0.5, 0.5])))  # off range 0.2
    config = PartialCoverageConfig(seeds=(1, 2), kl_coefs=(0.05,))
    for run in config.runs():  # every run finished already: nothing is started
        off = dpo_off_range if run.method == "dpo" else 0.2
        (out / "runs" / f"{run.name}.json").write_text(json.dumps(_fake_run(run.method, run.kl_coef, run.seed, off)))
    run_partial_coverage_lab(config, runs_dir, out)
    printed = capsys.readouterr().out
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] == (dpo_off_range == 0.5) and gate["rise"] == pytest.approx(dpo_off_range - 0.2)
    if gate["passed"]:
        assert printed.count("done already") == runs_kept
    else:
        assert printed.count("done already") == 1 and "the grid stops here" in printed
    assert (out / "summary.md").is_file() and (out / "world.json").is_file()


@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    """A tiny world (256 pretraining texts, one epoch), DPO and HyPO with 2 steps each through the real trainer
    in their own processes, 8 evaluation prompts: the JSON files and the tables come out."""
    from hypo.lab.partial_coverage.experiment import PartialCoverageConfig, run_partial_coverage_lab
    from hypo.lab.partial_coverage.language import world as world_module

    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    settings = dict(world_module.PRETRAIN)
    world_module.PRETRAIN.update(epochs=1, warmup_steps=2)
    try:
        record = world_module.build_world(runs_dir / "world", seed=0, log=lambda s: None, pretrain_texts=256)
    finally:
        world_module.PRETRAIN.update(settings)
    assert record["pairs"]["in_range"] == 1.0
    config = PartialCoverageConfig(seeds=(0,), kl_coefs=(0.05,), batch_size=256, epochs=1, eval_prompts=8, eval_samples=2,
                         gate=False)
    run_partial_coverage_lab(config, runs_dir, out)
    results = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert sorted(results) == ["dpo-s0", "hypo-kl0.05-s0"]
    for result in results.values():
        assert [c["step"] for c in result["checkpoints"]] == [1, 2]
        assert len(result["checkpoints"][0]["per_prompt"]["penalize"]["win"]) == 8
        assert result["checkpoints"][-1]["kl"][0] > 0
    assert not (runs_dir / "dpo-s0").exists()  # checkpoints deleted after evaluation
    assert "objective/kl" in results["hypo-kl0.05-s0"]["training_curve"][0]
    assert "DPO - hypo-kl0.05" not in (out / "summary.md").read_text()  # one seed: no paired interval

"""`hypo lab bandit --equal_terms`: the training loop matches the bandit lab's, stopping at a KL budget per instance,
the picks stay within the budget, and the tables come out the same for the same seed."""

from __future__ import annotations

import csv

import pytest
import torch

from hypo.lab.bandit.equal_terms import EqualTermsConfig, stopped_theta, train_with_snapshots, worst_of
from hypo.lab.bandit.experiments import spec_generator
from hypo.lab.bandit.problem import MethodSpec, sample_pairs
from hypo.lab.bandit.regimes import make_bandit_worlds
from hypo.lab.bandit.training import TrainSettings, train_policy


@pytest.mark.parametrize("spec", [MethodSpec("dpo", beta=0.1), MethodSpec("hypo_sampled", beta=0.1, kl_coef=0.1)])
def test_snapshots_follow_the_bandit_labs_training(spec):
    """The last snapshot is `train_policy`'s final theta (same loss, optimizer and sampling order), and the logged
    KL matches its history."""
    generator = torch.Generator().manual_seed(5)
    bandit, _ = make_bandit_worlds("linear-trap-bt", 3, generator)
    pairs = sample_pairs(bandit, 32, labels="bt", generator=generator)
    settings = TrainSettings(steps=30, log_every=10)
    theta, history = train_policy(bandit, pairs, spec, settings, generator=spec_generator(0, spec))
    snapshots, kls = train_with_snapshots(bandit, pairs, spec, settings, generator=spec_generator(0, spec))
    assert len(snapshots) == 4 and kls.shape == (4, 3)
    torch.testing.assert_close(snapshots[-1], theta, rtol=0, atol=0)
    torch.testing.assert_close(kls, history["objective/kl"])


def test_stopping_is_per_instance():
    snapshots = [torch.full((2, 1), float(t)) for t in range(4)]
    kls = torch.tensor([[0.0, 0.0], [0.5, 2.0], [1.5, 3.0], [0.9, 4.0]], dtype=torch.float64)  # (T, I)
    # instance 0 passes 1.0 at t = 2 (keeps t = 1, never sees the 0.9); instance 1 at t = 1 (keeps the reference)
    assert stopped_theta(snapshots, kls, 1.0).flatten().tolist() == [1.0, 0.0]
    assert stopped_theta(snapshots, kls, 5.0).flatten().tolist() == [3.0, 3.0]


def test_worst_of_is_the_lowest_world_mean():
    assert worst_of(torch.tensor([[1.0, 3.0], [0.0, 1.0]])) == 0.5


def test_quick_equal_terms_tables(tmp_path, capsys):
    from hypo.cli.main import main

    out = tmp_path / "a"
    assert main(["lab", "bandit", "--quick", "--equal_terms", "--instances", "3", "--output_dir", str(out)]) == 0
    assert "equal_terms" in capsys.readouterr().out
    with open(out / "equal_terms.csv") as f:
        rows = list(csv.DictReader(f))
    picks = [r for r in rows if r["setting"]]
    assert {r["row"] for r in picks} <= {"dpo", "hypo", "hypo_sampled", "rlhf"}
    assert all(float(r["kl"]) <= float(r["budget"]) for r in picks)  # every pick within its budget
    label_free = [r for r in picks if r["rule"] == "label_free"]
    oracle = {(r["regime"], r["budget"], r["row"]): float(r["worst"]) for r in picks if r["rule"] == "oracle"}
    for r in label_free:  # the oracle is at least as good as the label-free pick
        assert oracle[(r["regime"], r["budget"], r["row"])] >= float(r["worst"]) - 1e-9
    diffs = [r for r in rows if r["row"] == "hypo - dpo"]
    assert diffs and all(float(r["low"]) <= float(r["worst"]) <= float(r["high"]) for r in diffs)
    assert "## linear-trap-det" in (out / "equal_terms.md").read_text()
    other = tmp_path / "b"
    assert main(["lab", "bandit", "--quick", "--equal_terms", "--instances", "3", "--output_dir", str(other)]) == 0
    assert (other / "equal_terms.csv").read_text() == (out / "equal_terms.csv").read_text()
    assert not (out / "summary.md").exists()  # the main tables are not touched


def test_five_settings_per_method_by_default():
    specs = EqualTermsConfig().specs()
    assert {m: len(s) for m, s in specs.items()} == {"dpo": 5, "hypo": 5, "hypo_sampled": 5, "rlhf": 5}

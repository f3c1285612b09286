"""`hypo lab bandit --quick` end to end: the tables and plots are written, the world tables agree with
the main table, the same seed gives the same table; the aggregation over reward worlds by hand."""

import csv

import pytest
import torch

from hypo.cli.main import main
from hypo.lab.bandit.experiments import across_worlds, interval


def test_quick_lab_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "bandit", "--quick", "--instances", "2", "--output-dir", str(out)]) == 0
    assert "hypo lab bandit" in capsys.readouterr().out
    for name in ("results.csv", "summary.md", "config.json", "frontier.png", "curves_kl.png",
                 "curves_off_support.png", "worlds.csv", "worlds.md", "frontier_worlds.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "## tabular-partial-bt" in summary and "## linear-trap-det" in summary
    assert "## Reward-KL frontier at matched KL" in summary and "dpo, oracle early stop" in summary
    header, *rows = (out / "results.csv").read_text().splitlines()
    assert "objective/kl/mean" in header and "reward_gain/p10" in header
    assert len(rows) == 2 * (1 + 2 + 2 + 2 + 2)  # regimes x (reference, dpo, hypo, hypo_sampled, rlhf)
    worlds = (out / "worlds.md").read_text()
    assert "| beyond -3* | beyond 0 | beyond +3 | unseen -1.5 | unseen +1.5 |" in worlds  # linear-trap
    assert "| beyond -3 | beyond 0* | beyond +3 |" in worlds  # tabular-partial
    assert "## Matched KL, worst world" in worlds


def test_world_table_agrees_with_the_main_table(tmp_path):
    """The regime's own world in worlds.csv is results.csv's reward gain; results.csv's worst and mean over
    worlds are the min and mean of worlds.csv's per-world means (to rounding)."""
    out = tmp_path / "lab"
    assert main(["lab", "bandit", "--quick", "--instances", "3", "--output-dir", str(out)]) == 0
    with open(out / "results.csv") as f:
        results = list(csv.DictReader(f))
    with open(out / "worlds.csv") as f:
        worlds = list(csv.DictReader(f))
    assert len(worlds) == len(results) * 5  # both quick regimes have partial coverage: 5 worlds each
    for row in results:
        mine = [w for w in worlds if all(w[k] == row[k] for k in ("regime", "method", "beta", "kl_coef"))]
        gains = [float(w["reward_gain/mean"]) for w in mine]
        built = [float(w["reward_gain/mean"]) for w in mine if w["as_built"] == "True"]
        assert built == [pytest.approx(float(row["reward_gain/mean"]), abs=1e-4)]
        assert float(row["worlds/reward_gain/worst"]) == pytest.approx(min(gains), abs=2e-4)
        assert float(row["worlds/reward_gain/mean"]) == pytest.approx(sum(gains) / 5, abs=2e-4)
        assert float(row["worlds/reward_gain/instance_worst"]) <= float(row["worlds/reward_gain/worst"]) + 1e-4


def test_across_worlds_by_hand():
    """Worlds a, b, c over 2 instances: [1, 3], [0, 5], [4, -2]. Per-world means 2, 2.5, 1: worst 1 (c),
    mean (2 + 2.5 + 1) / 3 = 1.8333; each instance's worst: min(1, 0, 4) = 0, min(3, 5, -2) = -2, mean -1.
    Interval of c's mean: sd of [4, -2] = sqrt(18) = 4.2426, se = 3, 1 -+ 1.959964 * 3 = [-4.8799, 6.8799]."""
    result = across_worlds({name: torch.tensor(v, dtype=torch.float64)
                            for name, v in (("a", [1.0, 3.0]), ("b", [0.0, 5.0]), ("c", [4.0, -2.0]))})
    assert result["worst"] == pytest.approx(1.0)
    assert result["worst_world"] == "c"
    assert result["mean"] == pytest.approx(11 / 6)
    assert result["instance_worst"] == pytest.approx(-1.0)
    assert (result["worst_low"], result["worst_high"]) == (pytest.approx(-4.879892), pytest.approx(6.879892))
    assert interval(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)) == (2.0, 2.0)


def test_same_seed_same_table_other_seed_differs(tmp_path):
    tables = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        out = tmp_path / name
        args = ["lab", "bandit", "--quick", "--instances", "2", "--seed", seed, "--regimes", "tabular-partial-bt",
                "--output-dir", str(out)]
        assert main(args) == 0
        tables.append((out / "results.csv").read_text())
    assert tables[0] == tables[1]
    assert tables[0] != tables[2]


def test_unknown_regime_is_a_clear_error(tmp_path, capsys):
    assert main(["lab", "bandit", "--quick", "--regimes", "tabular-nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown regime 'tabular-nope'" in capsys.readouterr().err

"""`hypo report`: the comparison table from real run files (numbers chosen here), and valid PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from hypo.cli.main import main
from hypo.evaluation.report import load_run, markdown_table


def _write_run(root: Path, name: str, *, method: str, kl_coef: float, kl: float, judged: bool = True) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": method, "beta": 0.1, "kl_coef": kl_coef, "max_steps": 3}))
    records = [{"step": s, "loss": 0.7 - 0.1 * s, "loss/dpo": 0.69 - 0.1 * s, "rewards/margins": 0.1 * s,
                "objective/kl": kl * s / 3, "time/step": 1.25} for s in (1, 2, 3)]
    records.insert(2, {"step": 2, "eval_objective/kl": kl / 2, "eval_objective/kl_se": 0.01})
    records.append({"step": 3, "eval_objective/kl": kl, "eval_objective/kl_se": 0.02})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {"num_prompts": 8, "num_completions": 16, "objective/kl": kl, "objective/kl_se": 0.05,
               "completions/mean_length": 12.25, "completions/mean_length_se": 1.5,
               "completions/eos_rate": 0.75, "completions/eos_rate_se": 0.125}
    if judged:
        metrics.update({"win_rate": 0.625, "win_rate_ci_low": 0.4, "win_rate_ci_high": 0.85,
                        "judge/policy_score": 1.5, "judge/policy_score_se": 0.25})
    (run / "eval_results.json").write_text(json.dumps({"metrics": metrics, "settings": {}}))
    return run


def test_table_contents(tmp_path):
    a = _write_run(tmp_path, "hypo-a", method="hypo", kl_coef=0.05, kl=0.125)
    b = _write_run(tmp_path, "dpo-b", method="dpo", kl_coef=0.05, kl=0.5, judged=False)
    lines = markdown_table([load_run(a), load_run(b)]).splitlines()
    assert lines[0] == ("| run | method | beta | kl_coef | steps | win rate [95% CI] | judge score | reverse KL (k1) "
                        "| n prompts / completions | mean length | EOS rate | train time (s) |")
    # 3 logged steps of 1.25 s each -> 3.8 s (3.75 rounded to one decimal)
    assert lines[2] == ("| hypo-a | hypo | 0.100 | 0.050 | 3 | 0.625 [0.400, 0.850] | 1.500 ± 0.250 | 0.125 ± 0.050 "
                        "| 8 / 16 | 12.2 ± 1.5 | 0.75 ± 0.12 | 3.8 |")
    # DPO has no KL weight; no judge means no win rate or score
    assert lines[3] == ("| dpo-b | dpo | 0.100 | - | 3 | - | - | 0.500 ± 0.050 "
                        "| 8 / 16 | 12.2 ± 1.5 | 0.75 ± 0.12 | 3.8 |")


def test_table_shows_invalid_judgments_and_a_withheld_win_rate(tmp_path):
    a = _write_run(tmp_path, "some-invalid", method="hypo", kl_coef=0.05, kl=0.125)
    b = _write_run(tmp_path, "withheld", method="hypo", kl_coef=0.05, kl=0.125)
    for run, extra in ((a, {"num_invalid": 1, "invalid_rate": 1 / 16}), (b, {"num_invalid": 6, "invalid_rate": 0.375})):
        results = json.loads((run / "eval_results.json").read_text())
        results["metrics"].update(extra)
        if run == b:
            for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high"):
                del results["metrics"][key]
        (run / "eval_results.json").write_text(json.dumps(results))
    lines = markdown_table([load_run(a), load_run(b)]).splitlines()
    assert "| 3 | 0.625 [0.400, 0.850] (15/16 valid) | 1.500 ± 0.250 |" in lines[2]
    assert "| 3 | withheld (10/16 valid) | 1.500 ± 0.250 |" in lines[3]


def test_report_command_writes_markdown_and_valid_pngs(tmp_path):
    from PIL import Image

    runs = [_write_run(tmp_path, "r1", method="hypo", kl_coef=0.05, kl=0.1),
            _write_run(tmp_path, "r2", method="hypo", kl_coef=0.5, kl=0.02)]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--output-dir", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "![training curves](training_curves.png)" in text and "![judge score vs KL](frontier.png)" in text
    assert "| r1 | hypo |" in text and "| r2 | hypo | 0.100 | 0.500 |" in text
    for name in ("training_curves.png", "frontier.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_on_real_training_runs(tiny_model_dir, tiny_task, tmp_path):
    from PIL import Image
    from test_train import _config

    from hypo.training.trainer import train

    runs = [train(_config(tiny_model_dir, tiny_task, tmp_path, method, method=method, max_steps=2, eval_steps=1))
            for method in ("hypo", "dpo")]
    assert main(["report", *(str(r.output_dir) for r in runs), "--output-dir", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    for run in runs:
        m = run.eval["metrics"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.output_dir.name} |"))
        assert f"| 2 | {m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}] |" in row
        assert f"| {m['objective/kl']:.3f} ± {m['objective/kl_se']:.3f} | 2 / 4 |" in row
    with Image.open(tmp_path / "report" / "training_curves.png") as image:
        assert image.size[0] == 1600  # four panels: the evaluation KL was logged during training

"""Pilot runs of `hypo lab partial-coverage` (seed 100, not in the main grid), used to pick the learning rate
and the two HyPO kl_coef values before the preregistration (docs/coverage-lab-partial.md).

    PYTHONPATH=src python scripts/partial_coverage_pilot.py 3e-4 "" dpo        # then moved to pilot/lr3e-4/
    PYTHONPATH=src python scripts/partial_coverage_pilot.py 1e-4 "" dpo
    PYTHONPATH=src python scripts/partial_coverage_pilot.py 1e-4 0.05,0.5 hypo
    PYTHONPATH=src python scripts/partial_coverage_pilot.py 1e-4 0.01 hypo

Prints each checkpoint's reverse KL, off-range / long / short / EOS rates, mean length, positive-word rate,
win rate / gold score per world and the log-prob drift, plus the training curve.
"""

import json
import sys
from pathlib import Path

from hypo.lab.partial_coverage.experiment import PartialCoverageConfig, _child

runs_dir = Path("runs/lab-partial-coverage")
out = Path("docs/lab-results/partial-coverage/pilot")
lr, kls, methods = float(sys.argv[1]), [float(k) for k in sys.argv[2].split(",") if k], sys.argv[3].split(",")
config = PartialCoverageConfig(seeds=(100,), kl_coefs=tuple(kls), learning_rate=lr)
out.mkdir(parents=True, exist_ok=True)
if not (runs_dir / "world" / "world.json").is_file():
    _child("world", config, runs_dir / "world", out, runs_dir)
if not (out / "reference.json").is_file():
    _child("reference", config, runs_dir / "world", out, runs_dir)
reference = json.loads((out / "reference.json").read_text())
for run in config.runs():
    path = out / "runs" / f"{run.name}.json"
    if run.method not in methods or path.is_file():
        continue
    print(run.name, round(_child("run", config, runs_dir / "world", out, runs_dir, run)), "s", flush=True)
    result = json.loads(path.read_text())
    for c in [reference, *result["checkpoints"]]:
        worlds = " ".join(f"{w[:3]} {c['worlds'][w]['win_rate'][0]:.3f}/{c['worlds'][w]['score'][0]:.2f}"
                          for w in c["worlds"])
        drift = c.get("drift", {})
        print(f"{c['step']} kl {c['kl'][0]:.2f} k3 {c['kl_k3'][0]:.2f} off {c['off_range'][0]:.3f} "
              f"long {c['long_rate']:.3f} short {c['short_rate']:.3f} eos {c['eos_rate']:.3f} "
              f"len {c['mean_length_words']:.1f} pos {c['positive_rate']:.3f} {worlds} "
              f"drift tr {drift['train']['chosen']:.1f}/{drift['train']['rejected']:.1f} "
              f"ho {drift['heldout']['chosen']:.1f}/{drift['heldout']['rejected']:.1f}", flush=True)
    for block in result["training_curve"]:
        print("  train", block, flush=True)

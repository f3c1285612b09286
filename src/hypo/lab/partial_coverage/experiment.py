"""Coverage lab, part 3: DPO and HyPO on a synthetic language whose offline pairs cover only part of the
response space (`hypo.lab.partial_coverage.language`), judged in three gold worlds that agree on every pair.

`hypo lab partial-coverage` builds the world once (reference model + data, `runs/.../world/`), evaluates
the reference, then runs the grid one run at a time, each in its own process: `hypo.training.trainer.train` with a
checkpoint every half epoch, then every checkpoint (and the final model) evaluated on the held-out prompts
(reverse KL k1/k3, gold score and win rate in each world, off-range and EOS rates, log-prob drift of the
pairs), then the checkpoints deleted. Each run leaves one small JSON (`<output_dir>/runs/<name>.json`); a
run whose JSON exists is skipped, so an interrupted grid resumes. The gate: after the first seed's DPO run,
if DPO's off-range rate never rises 10 points above the reference's, the grid stops there.
The tables are made by `hypo.lab.partial_coverage.report` from the committed JSON files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WORLDS = ("penalize", "ignore", "reward")
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
          "MALLOC_TOP_PAD_": "1073741824"}  # docs/performance.md: the biggest CPU lever; read at process start
EVAL_SEED = 1234
GATE_POINTS = 0.10


@dataclass(frozen=True)
class PartialCoverageRun:
    method: str  # dpo | hypo
    kl_coef: float
    seed: int

    @property
    def name(self) -> str:
        return f"dpo-s{self.seed}" if self.method == "dpo" else f"hypo-kl{self.kl_coef:g}-s{self.seed}"


@dataclass
class PartialCoverageConfig:
    """The grid and the settings every run shares (preregistered in docs/coverage-lab-partial.md)."""

    seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    kl_coefs: tuple[float, ...] = (0.01, 0.05)
    beta: float = 0.1
    learning_rate: float = 1e-4
    epochs: int = 4
    batch_size: int = 8
    prompt_batch_size: int = 4
    num_generations: int = 4
    max_completion_length: int = 40
    warmup_ratio: float = 0.05
    checkpoints_per_epoch: int = 2
    eval_samples: int = 4
    eval_prompts: int = 128
    world_seed: int = 0
    gate: bool = True
    num_threads: int = 1  # 2 threads ran 25x slower than 1 on the shared 2-core machine (measured)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return 512 // self.batch_size

    @property
    def max_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def runs(self) -> list[PartialCoverageRun]:
        """Seed by seed: DPO, then HyPO at each kl_coef (the first run is the gate's)."""
        return [run for seed in self.seeds for run in (PartialCoverageRun("dpo", 0.0, seed),
                                                       *(PartialCoverageRun("hypo", k, seed) for k in self.kl_coefs))]


def train_config(run: PartialCoverageRun, config: PartialCoverageConfig, world: Path, run_dir: Path):
    from hypo.config import HyPOConfig

    return HyPOConfig(
        method=run.method, beta=config.beta, kl_coef=run.kl_coef if run.method == "hypo" else 0.0,
        num_generations=config.num_generations, per_device_prompt_batch_size=config.prompt_batch_size,
        max_completion_length=config.max_completion_length, model_name_or_path=str(world / "model"),
        dataset=str(world / "pairs.jsonl"), prompts=str(world / "unlabeled.jsonl"), eval_at_end=False,
        max_length=64, max_prompt_length=16, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, max_steps=config.max_steps,
        lr_scheduler_type="constant_with_warmup", warmup_ratio=config.warmup_ratio,
        save_steps=config.steps_per_epoch // config.checkpoints_per_epoch, save_total_limit=None, seed=run.seed,
        output_dir=str(run_dir), num_threads=config.num_threads, **config.extra)


# --- evaluation of one model -------------------------------------------------------------------------------


def _pair_batches(items: list[dict], pad_token_id: int, size: int = 64):
    from hypo.data.batches import PairCollator

    collate = PairCollator(pad_token_id)
    for start in range(0, len(items), size):
        yield collate(items[start : start + size])


def pair_logps(model, items: list[dict], pad_token_id: int) -> dict[str, list[float]]:
    """Sequence log-probs of the chosen and rejected completions of tokenized pairs."""
    import torch

    from hypo.objective.logprobs import completion_logps

    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for batch in _pair_batches(items, pad_token_id):
            for side in out:
                out[side] += completion_logps(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                              batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]).tolist()
    return out


def _mean_se(values) -> tuple[float, float]:
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def score_samples(rows: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Per-prompt and mean metrics of `hypo.evaluation.held_out.evaluate_policy` rows in every gold world.

    Win: policy sample j against reference sample j of the same prompt, ties half. A completion that hit the
    length limit without EOS counts as off range.
    """
    import numpy as np

    from hypo.lab.partial_coverage import language as pc

    prompts = sorted({r["prompt_index"] for r in rows})
    by_prompt: dict[int, list[dict]] = {p: [] for p in prompts}
    for r in rows:
        by_prompt[r["prompt_index"]].append(r)

    def per_prompt(fn) -> np.ndarray:
        return np.array([np.mean([fn(r) for r in by_prompt[p]]) for p in prompts])

    def ref_clipped(r) -> bool:
        return len(r["reference_text"].split()) >= max_new_tokens

    kl, k3 = per_prompt(lambda r: r["k1"]), per_prompt(lambda r: r["k3"])
    off = per_prompt(lambda r: pc.is_off_range(r["policy_text"], not r["policy_eos"]))
    out: dict[str, Any] = {
        "kl": _mean_se(kl), "kl_k3": _mean_se(k3), "off_range": _mean_se(off),
        "reference_off_range": float(per_prompt(lambda r: pc.is_off_range(r["reference_text"], ref_clipped(r))).mean()),
        "mean_length_words": float(per_prompt(lambda r: len(r["policy_text"].split())).mean()),
        "eos_rate": float(per_prompt(lambda r: float(r["policy_eos"])).mean()),
        "long_rate": float(per_prompt(lambda r: len(r["policy_text"].split()) > pc.RANGE[1]).mean()),
        "short_rate": float(per_prompt(lambda r: len(r["policy_text"].split()) < pc.RANGE[0]).mean()),
        "positive_rate": float(sum(pc.base_score(r["policy_text"]) for r in rows)
                               / max(1, sum(len(r["policy_text"].split()) for r in rows))),
        "worlds": {}, "per_prompt": {"kl": np.round(kl, 4).tolist(), "off_range": np.round(off, 4).tolist()},
    }
    for world in WORLDS:
        score = per_prompt(lambda r, w=world: pc.gold_score(r["policy_text"], w))
        ref = per_prompt(lambda r, w=world: pc.gold_score(r["reference_text"], w))

        def win(r, w=world) -> float:
            a, b = pc.gold_score(r["policy_text"], w), pc.gold_score(r["reference_text"], w)
            return 1.0 if a > b else 0.0 if a < b else 0.5

        wins = per_prompt(win)
        out["worlds"][world] = {"score": _mean_se(score), "reference_score": float(ref.mean()),
                                "win_rate": _mean_se(wins)}
        out["per_prompt"][world] = {"score": np.round(score, 4).tolist(), "win": np.round(wins, 4).tolist()}
    return out


def evaluate_model(policy, reference, tokenizer, eval_items, pairs: dict[str, list[dict]],
                   ref_pair_logps: dict[str, dict[str, list[float]]], config: PartialCoverageConfig,
                   reference_samples: dict | None = None) -> dict[str, Any]:
    """Samples on the held-out prompts (reverse KL, every world) and the log-prob drift of the pairs;
    `reference_samples` keeps the reference's samples across the checkpoints of a run (drawn once)."""
    import numpy as np

    from hypo.evaluation.held_out import evaluate_policy

    result = evaluate_policy(policy, reference, tokenizer, eval_items, judge=None, num_samples=config.eval_samples,
                             max_new_tokens=config.max_completion_length, batch_size=32, seed=EVAL_SEED,
                             baseline_samples=reference_samples)
    scored = score_samples(result["samples"], config.max_completion_length)
    scored["drift"] = {}
    for split, items in pairs.items():
        logps = pair_logps(policy, items, tokenizer.pad_token_id)
        scored["drift"][split] = {side: float(np.mean(np.subtract(logps[side], ref_pair_logps[split][side])))
                                  for side in ("chosen", "rejected")}
        scored["drift"][split]["accuracy"] = float(np.mean(
            np.subtract(logps["chosen"], ref_pair_logps[split]["chosen"])
            > np.subtract(logps["rejected"], ref_pair_logps[split]["rejected"])))
    return scored


def _load_eval_inputs(world: Path, tokenizer, config: PartialCoverageConfig):
    from hypo.data.encoding import load_preference_data, load_prompt_data

    eval_items, _ = load_prompt_data(str(world / "eval_prompts.jsonl"), tokenizer, max_prompt_length=16)
    lengths = {"max_length": 64, "max_prompt_length": 16, "max_completion_length": config.max_completion_length}
    pairs = {"train": load_preference_data(str(world / "pairs.jsonl"), tokenizer, **lengths)[0],
             "heldout": load_preference_data(str(world / "heldout_pairs.jsonl"), tokenizer, **lengths)[0]}
    return eval_items[: config.eval_prompts], pairs


def _training_curve(run_dir: Path, every: int) -> list[dict[str, float]]:
    """Training metrics averaged over each block of `every` steps (loss/dpo, objective/kl, margins, ...)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    keys = ("loss", "loss/dpo", "loss/kl", "objective/kl", "objective/kl_k3", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "completions/mean_length",
            "completions/clipped_ratio", "time/step")
    blocks = []
    for start in range(0, len(records), every):
        block = records[start : start + every]
        row = {"step": block[-1]["step"]}
        for key in keys:
            values = [r[key] for r in block if key in r]
            if values:
                row[key] = round(sum(values) / len(values), 5)
        blocks.append(row)
    return blocks


def train_and_evaluate(run: PartialCoverageRun, config: PartialCoverageConfig, world: Path, run_dir: Path,
                       result_path: Path) -> None:
    """One grid point, in this process: train, evaluate every checkpoint and the final model, write JSON."""
    import torch

    from hypo.models.loading import load_causal_lm, load_tokenizer
    from hypo.models.reference import Reference
    from hypo.training.checkpoints import checkpoint_step, list_checkpoints
    from hypo.training.trainer import train

    torch.set_num_threads(config.num_threads)
    if run_dir.exists():  # an interrupted run starts over (runs take minutes)
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    train_config_ = train_config(run, config, world, run_dir)
    train(train_config_)
    train_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(str(world / "model"))
    reference = Reference(load_causal_lm(str(world / "model")))
    eval_items, pairs = _load_eval_inputs(world, tokenizer, config)
    ref_pair_logps = {split: pair_logps(reference.model, items, tokenizer.pad_token_id) for split, items in pairs.items()}
    models = [(checkpoint_step(c), c) for c in list_checkpoints(run_dir)] + [(config.max_steps, run_dir / "model")]
    checkpoints, reference_samples = [], {}
    for step, path in models:
        policy = load_causal_lm(str(path))
        checkpoints.append({"step": step, "epoch": step / config.steps_per_epoch,
                            **evaluate_model(policy, reference, tokenizer, eval_items, pairs, ref_pair_logps, config,
                                             reference_samples)})
    result = {"run": asdict(run), "name": run.name, "lab": {k: v for k, v in asdict(config).items() if k != "seeds"},
              "train_config": {k: v for k, v in train_config_.to_dict().items() if v is not None},
              "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - start,
              "training_curve": _training_curve(run_dir, config.steps_per_epoch // config.checkpoints_per_epoch),
              "checkpoints": checkpoints}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    shutil.rmtree(run_dir)  # checkpoints and model: only the JSON is kept


def evaluate_reference(config: PartialCoverageConfig, world: Path, result_path: Path) -> dict[str, Any]:
    """The reference evaluated as a policy (step 0 of every run: KL 0, win rates near 0.5)."""
    import torch

    from hypo.models.loading import load_causal_lm, load_tokenizer
    from hypo.models.reference import Reference

    torch.set_num_threads(config.num_threads)
    tokenizer = load_tokenizer(str(world / "model"))
    reference = Reference(load_causal_lm(str(world / "model")))
    eval_items, pairs = _load_eval_inputs(world, tokenizer, config)
    ref_pair_logps = {split: pair_logps(reference.model, items, tokenizer.pad_token_id) for split, items in pairs.items()}
    result = {"step": 0, "epoch": 0.0, **evaluate_model(load_causal_lm(str(world / "model")), reference, tokenizer,
                                                        eval_items, pairs, ref_pair_logps, config)}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    return result


# --- the grid ----------------------------------------------------------------------------------------------


def _child(kind: str, config: PartialCoverageConfig, world: Path, out: Path, runs_dir: Path, run: PartialCoverageRun | None = None,
           log=print) -> float:
    """Run `kind` (world | reference | run) in its own process (nice 10, the allocator settings)."""
    spec = {"kind": kind, "config": asdict(config), "world": str(world), "out": str(out), "runs_dir": str(runs_dir),
            "run": asdict(run) if run else None}
    command = ["nice", "-n", "10", sys.executable, "-m", "hypo.lab.partial_coverage.experiment", json.dumps(spec)]
    log_path = runs_dir / f"{run.name if run else kind}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **MALLOC, "OMP_NUM_THREADS": str(config.num_threads)}).returncode
    if status != 0:
        raise RuntimeError(f"{run.name if run else kind} failed (exit {status}); see {log_path}")
    return time.perf_counter() - start


def gate_passed(reference: dict[str, Any], dpo_result: dict[str, Any]) -> tuple[bool, float]:
    """Whether DPO's off-range rate rose at least GATE_POINTS above the reference's at some checkpoint."""
    rise = max(c["off_range"][0] for c in dpo_result["checkpoints"]) - reference["off_range"][0]
    return rise >= GATE_POINTS, rise


def run_partial_coverage_lab(config: PartialCoverageConfig, runs_dir: Path, out: Path, collect_only: bool = False,
                             log=print) -> dict[str, Any]:
    from hypo.lab.partial_coverage.report import write_report

    world = runs_dir / "world"
    out.mkdir(parents=True, exist_ok=True)
    if not collect_only:
        if not (world / "world.json").is_file():
            log("building the world (reference model pretraining)")
            _child("world", config, world, out, runs_dir, log=log)
        shutil.copy(world / "world.json", out / "world.json")
        if not (out / "reference.json").is_file():
            log("evaluating the reference")
            _child("reference", config, world, out, runs_dir, log=log)
        reference = json.loads((out / "reference.json").read_text())
        runs = config.runs()
        for i, run in enumerate(runs, 1):
            path = out / "runs" / f"{run.name}.json"
            if path.is_file():
                log(f"[{i}/{len(runs)}] {run.name}: done already, kept")
            else:
                log(f"[{i}/{len(runs)}] {run.name}")
                seconds = _child("run", config, world, out, runs_dir, run, log=log)
                log(f"  {seconds:.0f} s")
            if i == 1 and config.gate:
                passed, rise = gate_passed(reference, json.loads(path.read_text()))
                (out / "gate.json").write_text(json.dumps({"run": run.name, "rise": rise, "threshold": GATE_POINTS,
                                                           "passed": passed}) + "\n")
                log(f"gate: DPO off-range rate rose {rise:+.3f} above the reference's: "
                    f"{'passed' if passed else 'FAILED, the grid stops here'}")
                if not passed:
                    break
    return write_report(out)


def _main(spec: dict[str, Any]) -> None:
    from hypo.lab.partial_coverage.world import build_world

    config = PartialCoverageConfig(**{**spec["config"], "seeds": tuple(spec["config"]["seeds"]),
                            "kl_coefs": tuple(spec["config"]["kl_coefs"])})
    world, out, runs_dir = Path(spec["world"]), Path(spec["out"]), Path(spec["runs_dir"])
    import torch

    torch.set_num_threads(config.num_threads)
    if spec["kind"] == "world":
        build_world(world, config.world_seed)
    elif spec["kind"] == "reference":
        evaluate_reference(config, world, out / "reference.json")
    else:
        run = PartialCoverageRun(**spec["run"])
        train_and_evaluate(run, config, world, runs_dir / run.name, out / "runs" / f"{run.name}.json")


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))

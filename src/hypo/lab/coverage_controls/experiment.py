"""Coverage lab, part 4: is HyPO's advantage coverage, overtraining or KL control? (docs/coverage-lab-controls.md)

The part-3 language (`hypo.lab.partial_coverage.language`) in several *worlds*, each a world seed that rebuilds the
prompt split, the data and the reference model, and in two *coverages* that share the reference, the prompts and
the gold worlds:
- partial: every offline response has a length in the data's range [8, 12] (part 3's pairs);
- full: offline responses drawn from the reference's whole length distribution (4-24 words, about 15% outside
  [8, 12]), labelled the same way (Bradley-Terry on the number of positive words), so of the three gold worlds
  only "ignore" agrees with these labels.

Every training seed of every (world, coverage) trains DPO and HyPO in the same number of settings
(`CoverageControlsConfig.settings`), through `hypo.training.trainer.train`, and evaluates each checkpoint with part 3's
evaluation (`hypo.lab.partial_coverage.experiment.evaluate_model`) plus the held-out pair loss. Each run leaves one JSON
without timings (`<output_dir>/runs/<run>.json`; a rerun writes the same bytes), its timing goes to
`timings.jsonl`. The runs of one (world, coverage, seed) cell share one process (run one after the other, each
seeded by the trainer), and a run whose JSON exists is skipped, so the grid resumes where it stopped. The
tables come from `hypo.lab.coverage_controls.report`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from hypo.lab.partial_coverage.experiment import MALLOC

COVERAGES = ("partial", "full")
REFERENCE_FOLDER = "reference"
PATH_KEYS = ("output_dir", "model_name_or_path", "dataset", "prompts")
"""Run-folder paths, left out of the results (the world seed and coverage name the data)."""
"""Sub-folder of a world holding part 3's `build_world` output (the reference model and its record)."""


@dataclass(frozen=True)
class Setting:
    """One training setting; every world, coverage and seed trains each setting once."""

    method: Literal["dpo", "hypo"]
    """dpo: offline pairs only; hypo: DPO plus kl_coef x the sampled reverse KL."""
    beta: float = 0.1
    """DPO's beta (both methods)."""
    kl_coef: float = 0.0
    """HyPO's weight of the online reverse-KL term (0 for DPO)."""
    lr_scheduler_type: Literal["constant_with_warmup", "linear"] = "constant_with_warmup"
    """constant_with_warmup (part 3's schedule) or linear decay to 0 at the last step."""

    @property
    def name(self) -> str:
        """'dpo-b0.1', 'dpo-b0.1-linear', 'hypo-kl0.01', ... (beta is shown for HyPO only when it is not 0.1)."""
        if self.method == "dpo":
            name = f"dpo-b{self.beta:g}"
        else:
            name = f"hypo-kl{self.kl_coef:g}" + ("" if self.beta == 0.1 else f"-b{self.beta:g}")
        return name + ("-linear" if self.lr_scheduler_type == "linear" else "")


DEFAULT_SETTINGS = (
    Setting("dpo", beta=0.1), Setting("dpo", beta=0.3), Setting("dpo", beta=1.0),
    Setting("dpo", beta=0.1, lr_scheduler_type="linear"),
    Setting("hypo", kl_coef=0.01), Setting("hypo", kl_coef=0.001), Setting("hypo", kl_coef=0.0001),
    Setting("hypo", kl_coef=0.00001),
)
"""Four per method: DPO's beta at three values and its default with a linearly decaying learning rate; HyPO's
kl_coef at four values, the smaller ones to reach DPO's failure region (10-300 nats; the pilot's kl_coef 0.0001
reached 12-22 nats, 0.001 stayed under 8)."""


@dataclass
class CoverageControlsConfig:
    """The grid and the settings every run shares (preregistered in docs/coverage-lab-controls.md)."""

    world_seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    """World seeds: each rebuilds prompts, pairs and the reference model (spaced by 10: a world uses seed..seed+8)."""
    seeds: tuple[int, ...] = (1, 2, 3)
    """Training seeds, the same in every world and coverage (runs are paired by world and seed)."""
    coverages: tuple[str, ...] = COVERAGES
    """Which pair sets to train on: partial and/or full."""
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS
    """The training settings of every cell."""
    learning_rate: float = 1e-4
    """Peak learning rate (part 3's)."""
    epochs: int = 4
    """Epochs over the 512 pairs (8 per step: 64 steps per epoch)."""
    batch_size: int = 8
    """Pairs per step."""
    prompt_batch_size: int = 4
    """HyPO: unlabeled prompts per step."""
    num_generations: int = 4
    """HyPO: samples per unlabeled prompt (leave-one-out baseline)."""
    max_completion_length: int = 40
    """Longest sample, in tokens (the reference's longest response is 24 words + EOS)."""
    warmup_ratio: float = 0.05
    """Warm-up fraction of both schedules."""
    checkpoints_per_epoch: int = 2
    """Evaluated checkpoints per epoch (every 32 steps)."""
    eval_samples: int = 2
    """Samples per held-out prompt, from the policy and from the reference (part 3: 4; 2 halves the evaluation)."""
    eval_prompts: int = 128
    """Held-out prompts per evaluation."""
    heldout_pairs_per_prompt: int = 2
    """Held-out pairs per evaluation prompt (the held-out pair loss, accuracy and drift; 256 pairs)."""
    pretrain_texts: int | None = None
    """Reference pretraining texts (None: part 3's 16,384)."""
    pretrain_epochs: int | None = None
    """Reference pretraining epochs (None: part 3's 6); the quick mode shrinks both."""
    num_threads: int = 1
    """torch threads per run (one: the machine is shared)."""

    @property
    def steps_per_epoch(self) -> int:
        return 512 // self.batch_size

    @property
    def max_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def save_steps(self) -> int:
        return max(1, self.steps_per_epoch // self.checkpoints_per_epoch)

    @classmethod
    def quick(cls) -> CoverageControlsConfig:
        """Two tiny worlds (256 pretraining texts, one epoch), one seed, DPO and HyPO with 2 steps each,
        8 evaluation prompts x 2 samples: the whole pipeline in about a minute (for the tests)."""
        return cls(world_seeds=(10, 20), seeds=(1,), settings=(Setting("dpo"), Setting("hypo", kl_coef=0.01)),
                   batch_size=256, epochs=1, eval_prompts=8, eval_samples=2, heldout_pairs_per_prompt=1,
                   pretrain_texts=256, pretrain_epochs=1)

    def cells(self) -> list[tuple[int, int, str]]:
        """(world seed, training seed, coverage) in run order: world by world, so that a grid run in parts
        completes whole worlds first."""
        return [(w, s, c) for w in self.world_seeds for s in self.seeds for c in self.coverages]


def run_name(world_seed: int, coverage: str, seed: int, setting: Setting) -> str:
    """'w10-partial-s1-dpo-b0.1'."""
    return f"w{world_seed}-{coverage}-s{seed}-{setting.name}"


# --- the worlds -----------------------------------------------------------------------------------------------


def make_full_coverage_pairs(prompts: list[str], pairs_per_prompt: int, seed: int) -> list[dict]:
    """Offline pairs whose responses come from the reference's whole length distribution (lengths 4-24), labelled
    Bradley-Terry on the number of positive words: P(a preferred) = sigmoid(base(a) - base(b)).

    Example: with lengths drawn by `sample_length`, about 15% of the responses lie outside [8, 12].
    """
    from hypo.lab.partial_coverage import language as pc

    rng = random.Random(seed)
    rows = []
    for prompt in prompts:
        for _ in range(pairs_per_prompt):
            a, b = pc.sample_response(rng), pc.sample_response(rng)
            p = 1.0 / (1.0 + math.exp(-(pc.base_score(a) - pc.base_score(b))))
            chosen, rejected = (a, b) if rng.random() < p else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def coverage_pairs(coverage: str, world_seed: int, heldout_per_prompt: int) -> dict[str, list[dict]]:
    """The training pairs (4 per pair prompt) and held-out pairs (`heldout_per_prompt` per evaluation prompt)
    of one coverage. Partial: part 3's training pairs (the same rows `build_world` writes) and in-range held-out
    pairs; full: both from the whole length distribution. Seeds: world_seed + 1 (partial) or + 6 (full) for the
    training pairs, + 7 (partial) or + 8 (full) for the held-out pairs."""
    from hypo.lab.partial_coverage import language as pc

    split = pc.split_prompts(world_seed)
    if coverage == "partial":
        return {"pairs": pc.make_pairs(split.pairs, 4, world_seed + 1),
                "heldout_pairs": pc.make_pairs(split.eval, heldout_per_prompt, world_seed + 7)}
    if coverage == "full":
        return {"pairs": make_full_coverage_pairs(split.pairs, 4, world_seed + 6),
                "heldout_pairs": make_full_coverage_pairs(split.eval, heldout_per_prompt, world_seed + 8)}
    raise ValueError(f"coverage must be one of {COVERAGES}, got {coverage!r}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_controls_world(world: Path, world_seed: int, config: CoverageControlsConfig, log=print) -> dict[str, Any]:
    """`world/reference/` by part 3's `build_world` (model, prompts, record), then one folder per coverage with
    the layout part 3's evaluation reads: `model/` (a copy of the reference), `pairs.jsonl`, `heldout_pairs.jsonl`,
    `unlabeled.jsonl`, `eval_prompts.jsonl` and `coverage.json` (the pairs' length statistics). Idempotent."""
    from hypo.lab.partial_coverage import world as world_module

    reference = world / REFERENCE_FOLDER
    saved = dict(world_module.PRETRAIN)
    if config.pretrain_epochs is not None:
        world_module.PRETRAIN.update(epochs=config.pretrain_epochs, warmup_steps=min(50, 2 * config.pretrain_epochs))
    try:
        record = world_module.build_world(reference, world_seed, log=log, pretrain_texts=config.pretrain_texts)
    finally:
        world_module.PRETRAIN.clear()
        world_module.PRETRAIN.update(saved)
    for coverage in config.coverages:
        folder = world / coverage
        if (folder / "coverage.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "model").exists():
            shutil.rmtree(folder / "model")
        shutil.copytree(reference / "model", folder / "model")
        for name in ("unlabeled.jsonl", "eval_prompts.jsonl"):
            shutil.copy(reference / name, folder / name)
        files = coverage_pairs(coverage, world_seed, config.heldout_pairs_per_prompt)
        for name, rows in files.items():
            _write_jsonl(folder / f"{name}.jsonl", rows)
        stats = {name: world_module.response_stats([r[k] for r in rows for k in ("chosen", "rejected")])
                 for name, rows in files.items()}
        (folder / "coverage.json").write_text(json.dumps({"world_seed": world_seed, "coverage": coverage, **stats},
                                                         indent=1) + "\n")
    return record


# --- one run ----------------------------------------------------------------------------------------------------


def train_config(setting: Setting, seed: int, config: CoverageControlsConfig, folder: Path, run_dir: Path):
    """Part 3's `hypo train` settings, with the setting's beta, kl_coef and schedule."""
    from hypo.config import HyPOConfig

    return HyPOConfig(
        method=setting.method, beta=setting.beta, kl_coef=setting.kl_coef if setting.method == "hypo" else 0.0,
        num_generations=config.num_generations, per_device_prompt_batch_size=config.prompt_batch_size,
        max_completion_length=config.max_completion_length, model_name_or_path=str(folder / "model"),
        dataset=str(folder / "pairs.jsonl"), prompts=str(folder / "unlabeled.jsonl"), eval_at_end=False,
        max_length=64, max_prompt_length=16, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, max_steps=config.max_steps,
        lr_scheduler_type=setting.lr_scheduler_type, warmup_ratio=config.warmup_ratio,
        save_steps=config.save_steps, save_total_limit=None, seed=seed, output_dir=str(run_dir),
        num_threads=config.num_threads)


def _part3_config(config: CoverageControlsConfig):
    """Part 3's evaluation settings object (sample count, prompts, length limit) for `evaluate_model`."""
    from hypo.lab.partial_coverage.experiment import PartialCoverageConfig

    return PartialCoverageConfig(eval_samples=config.eval_samples, eval_prompts=config.eval_prompts,
                                 max_completion_length=config.max_completion_length, num_threads=config.num_threads)


def heldout_pair_metrics(policy_logps: dict[str, list[float]], ref_logps: dict[str, list[float]],
                         beta: float) -> dict[str, float]:
    """Held-out DPO loss at `beta` (and at 0.1), accuracy and mean margin of the implicit reward, and the mean
    drift of the chosen and rejected log-probs (policy minus reference; part 3's drift).

    margin_i = (logp(y+) - ref(y+)) - (logp(y-) - ref(y-)); loss = mean -log sigmoid(beta * margin);
    accuracy = mean of 1[margin > 0] + 0.5 * 1[margin == 0] (the reference scores 0.5).
    Example: margins [0, 2], beta 0.5 -> loss (log 2 + log(1 + e^-1)) / 2 = 0.5032, accuracy 0.75.
    """
    drift = {side: [p - r for p, r in zip(policy_logps[side], ref_logps[side], strict=True)]
             for side in ("chosen", "rejected")}
    margins = [c - r for c, r in zip(drift["chosen"], drift["rejected"], strict=True)]

    def loss(b: float) -> float:
        return sum(math.log1p(math.exp(-b * m)) if b * m > -30 else -b * m for m in margins) / len(margins)

    return {"loss": loss(beta), "loss_beta_0.1": loss(0.1),
            "accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins),
            "margin": sum(margins) / len(margins), "drift_chosen": sum(drift["chosen"]) / len(margins),
            "drift_rejected": sum(drift["rejected"]) / len(margins), "pairs": len(margins)}


def compact(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Part 3's evaluation without its per-prompt lists (means and standard errors only)."""
    return {k: v for k, v in evaluation.items() if k != "per_prompt"}


class Cell:
    """One (world, coverage) folder loaded once: tokenizer, reference, evaluation prompts, held-out pairs with the
    reference's log-probs, and the reference's evaluation samples (drawn once, shared by every checkpoint of every
    run of the cell)."""

    def __init__(self, folder: Path, config: CoverageControlsConfig):
        from hypo.lab.partial_coverage.experiment import _load_eval_inputs, pair_logps
        from hypo.models.loading import load_causal_lm, load_tokenizer
        from hypo.models.reference import Reference

        self.folder, self.config, self.part3 = folder, config, _part3_config(config)
        self.tokenizer = load_tokenizer(str(folder / "model"))
        self.reference = Reference(load_causal_lm(str(folder / "model")))
        self.eval_items, pairs = _load_eval_inputs(folder, self.tokenizer, self.part3)
        self.heldout_pairs = pairs["heldout"]
        self.ref_heldout_logps = pair_logps(self.reference.model, self.heldout_pairs, self.tokenizer.pad_token_id)
        self.reference_samples: dict = {}

    def evaluate(self, policy, step: int, beta: float) -> dict[str, Any]:
        """Part 3's sampled evaluation (no pair drift: it is in `heldout`) and the held-out pair metrics."""
        from hypo.lab.partial_coverage.experiment import evaluate_model, pair_logps

        scored = evaluate_model(policy, self.reference, self.tokenizer, self.eval_items, {}, {}, self.part3,
                                self.reference_samples)
        heldout = heldout_pair_metrics(pair_logps(policy, self.heldout_pairs, self.tokenizer.pad_token_id),
                                       self.ref_heldout_logps, beta)
        return {"step": step, **{k: v for k, v in compact(scored).items() if k != "drift"}, "heldout": heldout}


def train_and_evaluate(cell: Cell, setting: Setting, seed: int, run_dir: Path, result_path: Path,
                       meta: dict[str, Any]) -> float:
    """One run: train, evaluate the reference (step 0) and every checkpoint, write the JSON; returns seconds."""
    from hypo.lab.partial_coverage.experiment import _training_curve
    from hypo.models.loading import load_causal_lm
    from hypo.training.checkpoints import checkpoint_step, list_checkpoints
    from hypo.training.trainer import train

    config = cell.config
    if run_dir.exists():  # an interrupted run starts over
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    train_config_ = train_config(setting, seed, config, cell.folder, run_dir)
    train(train_config_)
    train_seconds = time.perf_counter() - start
    models = [(checkpoint_step(c), c) for c in list_checkpoints(run_dir)]
    if not models or models[-1][0] != config.max_steps:
        models.append((config.max_steps, run_dir / "model"))
    checkpoints = [cell.evaluate(load_causal_lm(str(path)), step, setting.beta) for step, path in models]
    result = {"name": result_path.stem, **meta, "setting": {**asdict(setting), "name": setting.name},
              "train_config": {k: v for k, v in train_config_.to_dict().items() if v is not None and k not in PATH_KEYS},
              "training_curve": [{k: v for k, v in row.items() if k != "time/step"}
                                 for row in _training_curve(run_dir, config.save_steps)],
              "checkpoints": checkpoints}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    shutil.rmtree(run_dir)  # checkpoints and model: only the JSON is kept
    return train_seconds


def evaluate_reference(cell: Cell, result_path: Path, meta: dict[str, Any]) -> None:
    """The reference as a policy (step 0 of every run of the cell: KL 0, win rates near 0.5)."""
    from hypo.models.loading import load_causal_lm

    result = {**meta, **cell.evaluate(load_causal_lm(str(cell.folder / "model")), 0, 0.1)}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, separators=(",", ":")) + "\n")


def run_cell(config: CoverageControlsConfig, runs_dir: Path, out: Path, world_seed: int, seed: int,
             coverage: str, only: list[str] | None = None) -> None:
    """Every missing run of one (world, seed, coverage) (of the settings named in `only`, if given), in this process,
    one after the other."""
    import torch

    torch.set_num_threads(config.num_threads)
    folder = runs_dir / f"w{world_seed}" / coverage
    cell = Cell(folder, config)
    meta = {"world_seed": world_seed, "coverage": coverage}
    reference_path = out / "reference" / f"w{world_seed}-{coverage}.json"
    if not reference_path.is_file():
        evaluate_reference(cell, reference_path, meta)
    for setting in config.settings:
        name = run_name(world_seed, coverage, seed, setting)
        path = out / "runs" / f"{name}.json"
        if path.is_file() or (only is not None and setting.name not in only):
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        train_seconds = train_and_evaluate(cell, setting, seed, runs_dir / "tmp" / name, path,
                                           {**meta, "seed": seed})
        with (out / "timings.jsonl").open("a") as handle:
            handle.write(json.dumps({"run": name, "train_seconds": round(train_seconds, 2),
                                     "wall_seconds": round(time.perf_counter() - start, 2),
                                     "cpu_seconds": round(time.process_time() - cpu_start, 2)}) + "\n")


# --- the grid ---------------------------------------------------------------------------------------------------


def _spawn(spec: dict[str, Any], log_path: Path, num_threads: int) -> float:
    """`python -m hypo.lab.coverage_controls.experiment <spec>` at nice 10 with the allocator settings; returns seconds."""
    command = ["nice", "-n", "10", sys.executable, "-m", "hypo.lab.coverage_controls.experiment", json.dumps(spec)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("a") as handle:  # a cell runs once per phase: its log keeps every phase
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, **MALLOC, "OMP_NUM_THREADS": str(num_threads)}).returncode
    if status != 0:
        raise RuntimeError(f"{spec['kind']} {spec.get('cell', spec.get('world_seed'))} failed (exit {status}); "
                           f"see {log_path}")
    return time.perf_counter() - start


def config_to_dict(config: CoverageControlsConfig) -> dict[str, Any]:
    return {**asdict(config), "settings": [asdict(s) for s in config.settings]}


def config_from_dict(values: dict[str, Any]) -> CoverageControlsConfig:
    values = dict(values)
    values["settings"] = tuple(Setting(**s) for s in values["settings"])
    for key in ("world_seeds", "seeds", "coverages"):
        values[key] = tuple(values[key])
    return CoverageControlsConfig(**values)


def missing_runs(config: CoverageControlsConfig, out: Path, world_seed: int, seed: int, coverage: str,
                 only: list[str] | None = None) -> list[str]:
    """Names of the settings (among `only`, if given) whose run of this cell has no JSON yet."""
    return [s.name for s in config.settings if (only is None or s.name in only)
            and not (out / "runs" / f"{run_name(world_seed, coverage, seed, s)}.json").is_file()]


def run_order(config: CoverageControlsConfig) -> list[tuple[int, int, str, list[str]]]:
    """(world seed, seed, coverage, setting names) in three phases, so that a grid stopped part-way has answered
    the most: 1) the primary endpoint's two settings in every cell, world by world; 2) the other settings under
    partial coverage; 3) the other settings under full coverage. The order does not change any result (every run
    is seeded on its own).

    Example: the default grid -> 30 cells of ['dpo-b0.1', 'hypo-kl0.01'], then 15 partial and 15 full cells of the
    other six settings.
    """
    from hypo.lab.coverage_controls.report import PRIMARY_DPO, PRIMARY_HYPO

    names = [s.name for s in config.settings]
    primary = [n for n in names if n in (PRIMARY_DPO, PRIMARY_HYPO)]
    others = [n for n in names if n not in primary]
    order = [(w, s, c, primary) for w, s, c in config.cells()] if primary else []
    for coverage in config.coverages:
        order += [(w, s, c, others) for w, s, c in config.cells() if c == coverage] if others else []
    return order


def build_and_record_world(config: CoverageControlsConfig, runs_dir: Path, out: Path, spec: dict[str, Any],
                           world_seed: int, log=print) -> None:
    """Build the world in its own process unless it exists, and copy its record (without timings) under `out`."""
    world = runs_dir / f"w{world_seed}"
    if not all((world / c / "coverage.json").is_file() for c in config.coverages):
        log(f"building world {world_seed}")
        seconds = _spawn({**spec, "kind": "world", "world_seed": world_seed}, runs_dir / "logs" /
                         f"world-{world_seed}.log", config.num_threads)
        log(f"  {seconds:.0f} s")
    record = json.loads((world / REFERENCE_FOLDER / "world.json").read_text())
    (out / "worlds").mkdir(exist_ok=True)
    coverage = {c: json.loads((world / c / "coverage.json").read_text()) for c in config.coverages}
    (out / "worlds" / f"w{world_seed}.json").write_text(json.dumps(
        {"reference": {k: v for k, v in record.items() if k != "pretraining"} |
         {"pretraining_loss_per_epoch": record["pretraining"]["loss_per_epoch"]}, "coverage": coverage},
        indent=1) + "\n")


def run_coverage_controls(config: CoverageControlsConfig, runs_dir: Path, out: Path, collect_only: bool = False,
                          log=print) -> dict[str, Any]:
    """Build the missing worlds and run the missing runs (`run_order`; each cell's runs of a phase in one process),
    then write the tables."""
    from hypo.lab.coverage_controls.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    if not collect_only:
        (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=1) + "\n")
        spec = {"config": config_to_dict(config), "runs_dir": str(runs_dir), "out": str(out)}
        built: set[int] = set()
        order = run_order(config)
        for i, (world_seed, seed, coverage, names) in enumerate(order, 1):
            if world_seed not in built:
                build_and_record_world(config, runs_dir, out, spec, world_seed, log)
                built.add(world_seed)
            missing = missing_runs(config, out, world_seed, seed, coverage, names)
            label = f"[{i}/{len(order)}] w{world_seed} s{seed} {coverage}"
            if not missing:
                log(f"{label}: done already, kept")
                continue
            log(f"{label}: {', '.join(missing)}")
            seconds = _spawn({**spec, "kind": "cell", "cell": [world_seed, seed, coverage], "settings": missing},
                             runs_dir / "logs" / f"w{world_seed}-{coverage}-s{seed}.log", config.num_threads)
            log(f"  {seconds:.0f} s")
    return write_report(out, config)


def _main(spec: dict[str, Any]) -> None:
    import torch

    config = config_from_dict(spec["config"])
    torch.set_num_threads(config.num_threads)
    runs_dir, out = Path(spec["runs_dir"]), Path(spec["out"])
    if spec["kind"] == "world":
        build_controls_world(runs_dir / f"w{spec['world_seed']}", spec["world_seed"], config)
    else:
        world_seed, seed, coverage = spec["cell"]
        run_cell(config, runs_dir, out, world_seed, seed, coverage, spec.get("settings"))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))

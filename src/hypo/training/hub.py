"""Sharing a trained model: a model card (README.md in the model folder) and the upload to the Hugging Face Hub.

The card says what a reader needs to trust or reuse the model: the base model, the data (with splits and
configurations), the method and its hyperparameters, the hypo version and the framework versions, and the
evaluation results with their uncertainty and sample counts. Its YAML header carries the Hub's metadata
(`base_model`, `datasets`, `library_name`, `tags`) so the Hub links the model to its base and its data.
`push_model` is the real `huggingface_hub` upload (`create_repo` + `upload_folder`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CITATION = """@inproceedings{song2024importance,
  title     = {The Importance of Online Data: Understanding Preference Fine-tuning via Coverage},
  author    = {Song, Yuda and Swamy, Gokul and Singh, Aarti and Bagnell, J. Andrew and Sun, Wen},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2024},
  note      = {arXiv:2406.01462}
}"""
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The model behind hypo's embedded default (its Q4_1 GGUF, dequantized)."""
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
METHODS = {
    "hypo": "HyPO (Hybrid Preference Optimization, Song et al., arXiv 2406.01462): the DPO loss on offline "
            "preference pairs plus `kl_coef` times the reverse KL to the reference, estimated on fresh samples "
            "of the policy for unlabeled prompts (REINFORCE with a leave-one-out baseline)",
    "dpo": "DPO (Direct Preference Optimization, Rafailov et al., arXiv 2305.18290) on offline preference pairs",
    "sft": "supervised fine-tuning (TRL's SFTTrainer) on prompt-completion data",
}
TRAINING_HYPERPARAMETERS = (
    "method", "beta", "loss_type", "loss_weights", "label_smoothing", "kl_coef", "num_generations",
    "per_device_prompt_batch_size", "max_completion_length", "learning_rate", "lr_scheduler_type", "warmup_ratio",
    "weight_decay", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "max_length", "max_prompt_length", "mixed_precision", "dtype", "use_peft", "lora_r",
    "lora_alpha", "seed")
EVAL_ROWS = (  # (label, metric key, standard-error key)
    ("reverse KL to the reference (nats, k1)", "objective/kl", "objective/kl_se"),
    ("mean completion length (tokens)", "completions/mean_length", "completions/mean_length_se"),
    ("judge score of the policy", "judge/policy_score", "judge/policy_score_se"),
    ("judge score of the baseline", "judge/reference_score", "judge/reference_score_se"),
)


@dataclass
class ModelCard:
    """What README.md says; `render` writes it."""

    name: str
    method: str  # a key of METHODS
    base_model: str
    data: dict[str, str]  # role ("preference pairs", ...) -> source with split / configuration
    hyperparameters: dict[str, Any]
    results: list[str] = field(default_factory=list)  # markdown lines
    hub_datasets: list[str] = field(default_factory=list)

    def render(self) -> str:
        tags = list(dict.fromkeys(["hypo", self.method] + (["preference-optimization"] if self.method != "sft" else [])))
        header = {"library_name": "transformers", "tags": tags, "pipeline_tag": "text-generation"}
        if _HUB_ID.match(self.base_model):
            header["base_model"] = self.base_model
        if self.hub_datasets:
            header["datasets"] = self.hub_datasets
        lines = ["---", *_yaml(header), "---", "", f"# {self.name}", "",
                 f"Fine-tuned from `{self.base_model}` with {METHODS[self.method]}, using "
                 f"hypo {_version('hypo')}.", "", "## Training data", ""]
        lines += [f"- {role}: {source}" for role, source in self.data.items()]
        lines += ["", "## Hyperparameters", "",
                  *_table(["setting", "value"], [[k, _plain(v)] for k, v in self.hyperparameters.items()])]
        lines += ["", "## Evaluation", "", *(self.results or ["No evaluation was run."])]
        versions = ", ".join(f"{name} {_version(name)}" for name in ("hypo", "torch", "transformers", "accelerate",
                                                                      "trl", "peft"))
        lines += ["", "## Framework versions", "", versions, "", "## Citation", "", "```bibtex", CITATION, "```", ""]
        return "\n".join(lines)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(headers)} |", f"| {' | '.join('---' for _ in headers)} |",
            *(f"| {' | '.join(row)} |" for row in rows)]


def _yaml(header: dict[str, Any]) -> list[str]:
    """The few YAML shapes a card header needs (strings and lists of strings), quoted as JSON strings."""
    out = []
    for key, value in header.items():
        if isinstance(value, list):
            out += [f"{key}:", *(f"- {json.dumps(item)}" for item in value)]
        else:
            out.append(f"{key}: {json.dumps(value)}")
    return out


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _plain(value: Any) -> str:
    return f"`{value}`" if value is not None else "-"


def _source(name: str | None, split: str | None = None, config_name: str | None = None) -> str:
    parts = [f"split `{split}`"] if split else []
    parts += [f"configuration `{config_name}`"] if config_name else []
    return f"`{name}`" + (f" ({', '.join(parts)})" if parts else "")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).expanduser().exists()


def base_model_name(model_name_or_path: str) -> str:
    from hypo.config import DEFAULT_MODEL

    return EMBEDDED_BASE if model_name_or_path in ("", DEFAULT_MODEL) else model_name_or_path


def _number(value: float, se: float | None = None) -> str:
    text = f"{value:.4g}"
    return text + (f" ± {se:.2g}" if se is not None and math.isfinite(se) else "")


def results_lines(eval_results: dict[str, Any] | None, pair_metrics: dict[str, float] | None,
                  final_metrics: dict[str, float] | None) -> list[str]:
    """Markdown for the card: the held-out evaluation (mean ± standard error across prompts, win rate with its
    95% interval, counts), the held-out pair metrics and the last training step's loss."""
    lines: list[str] = []
    if eval_results:
        m, s = eval_results["metrics"], eval_results.get("settings", {})
        sampling = f" sampled at temperature {s['temperature']}" if "temperature" in s else ""
        judged = f", judge `{s['judge']}` against `{s.get('baseline', 'reference')}`" if s.get("judge") else ""
        lines += [f"Held-out prompts: {int(m['num_prompts'])} prompts, {int(m['num_completions'])} completions"
                  f"{sampling}{judged}, seed {s.get('seed')}.", ""]
        rows = [[label, _number(m[key], m.get(se))] for label, key, se in EVAL_ROWS if key in m]
        if "win_rate" in m:
            rows.append(["win rate vs the baseline (ties count half; 95% CI)",
                         f"{m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}]"])
        lines += _table(["metric", "value"], rows)
    if pair_metrics:
        lines += ["", "Held-out preference pairs (TRL's names):", "",
                  *_table(["metric", "value"], [[k, _number(v)] for k, v in pair_metrics.items()])]
    if final_metrics:
        shown = {k: v for k, v in final_metrics.items() if k in ("loss", "loss/dpo", "loss/kl", "rewards/accuracies",
                                                                    "rewards/margins", "objective/kl")}
        if shown:
            lines += ["", "Last training step: " + ", ".join(f"{k} {_number(v)}" for k, v in shown.items()) + "."]
    return lines[1:] if lines and lines[0] == "" else lines


def training_card(config, *, name: str, eval_results: dict[str, Any] | None = None,
                  pair_metrics: dict[str, float] | None = None, final_metrics: dict[str, float] | None = None,
                  num_processes: int = 1, notes: list[str] | None = None,
                  data: dict[str, str] | None = None) -> ModelCard:
    """The card of a `hypo train` run (`config`: its `HyPOConfig`; `num_processes`: data-parallel processes;
    `notes`: lines before the results, e.g. why the run stopped; `data`: role -> description of rows handed over in
    memory, which replace the config's sources for those roles)."""
    c, in_memory = config, data or {}
    if c.dataset is None and "preference pairs" not in in_memory:
        data = {"preference pairs, unlabeled prompts and held-out prompts": f"hypo's bundled task `{c.task}`"}
    else:
        data = {"preference pairs": _source(c.dataset, c.dataset_split, c.dataset_config)} if c.dataset else {}
        if c.method == "hypo":
            data["unlabeled prompts (online KL term)"] = _source(c.prompts, c.prompts_split, c.prompts_config) \
                if c.prompts else "the prompts of the preference pairs"
        if c.eval_prompts:
            data["held-out prompts"] = _source(c.eval_prompts, c.eval_prompts_split, c.eval_prompts_config)
    if c.eval_dataset:
        data["held-out preference pairs"] = _source(c.eval_dataset, c.eval_dataset_split, c.eval_dataset_config)
    data.update(in_memory)
    hyperparameters = {k: getattr(c, k) for k in TRAINING_HYPERPARAMETERS}
    hyperparameters["total_train_batch_size"] = c.per_device_train_batch_size * c.gradient_accumulation_steps * \
        num_processes
    if c.max_steps != -1:
        hyperparameters.pop("num_train_epochs")
    if c.method == "dpo":
        for key in ("kl_coef", "num_generations", "per_device_prompt_batch_size"):
            hyperparameters.pop(key)
    if c.loss_weights is None:
        hyperparameters.pop("loss_weights")
    if not c.use_peft:
        hyperparameters.pop("lora_r")
        hyperparameters.pop("lora_alpha")
    sources = (c.dataset, c.prompts, c.eval_prompts, c.eval_dataset)
    results = results_lines(eval_results, pair_metrics, final_metrics)
    if notes:
        results = [*notes, "", *(results or ["No evaluation was run."])]
    return ModelCard(name=name, method=c.method, base_model=base_model_name(c.model_name_or_path), data=data,
                     hyperparameters=hyperparameters, results=results,
                     hub_datasets=list(dict.fromkeys(s for s in sources if _is_hub_id(s))))


def write_model_card(model_dir: str | Path, card: ModelCard) -> Path:
    """README.md in the model folder (replacing one that is there)."""
    path = Path(model_dir) / "README.md"
    path.write_text(card.render())
    return path


def hub_repo_id(hub_model_id: str | None, output_dir: str | Path) -> str:
    """The repository to push to: `hub_model_id`, else the name of the run folder (as TRL does)."""
    return hub_model_id or Path(output_dir).resolve().name


def push_model(model_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
               commit_message: str = "Upload model trained with hypo") -> str:
    """Create the model repository if needed and upload the whole model folder (weights, tokenizer, README.md,
    a LoRA adapter folder). Returns the repository URL. The token comes from `token`, HF_TOKEN or the login."""
    from huggingface_hub import HfApi

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json)")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")
    return str(url)


def share_trained_model(config, model_dir: str | Path, *, output_dir: str | Path,
                        eval_results: dict[str, Any] | None = None, pair_metrics: dict[str, float] | None = None,
                        final_metrics: dict[str, float] | None = None, num_processes: int = 1,
                        notes: list[str] | None = None, data: dict[str, str] | None = None) -> str | None:
    """End of a `hypo train` run, on the main process: write the model card, then (with `push_to_hub`) upload
    the model folder. Returns the repository URL when pushed. `notes`, `data`: as in `training_card`."""
    repo_id = hub_repo_id(config.hub_model_id, output_dir)
    card = training_card(config, name=repo_id, eval_results=eval_results, pair_metrics=pair_metrics,
                         final_metrics=final_metrics, num_processes=num_processes, notes=notes, data=data)
    write_model_card(model_dir, card)
    if not config.push_to_hub:
        return None
    return push_model(model_dir, repo_id, private=config.hub_private_repo,
                      commit_message=f"hypo train --method {config.method}")

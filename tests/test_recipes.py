"""Every recipe under recipes/ dry-runs: the same config files users run, through the same commands, on the tiny
model and local datasets laid out like the real ones on the Hub (a README that declares the splits, parquet
files, the same columns and split names); only the model and data paths, the step count and the lengths are
overridden. Accelerate configs load with accelerate's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hypo.cli.main import main
from hypo.config import HyPOConfig, read_config_file

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TRAIN_RECIPES = sorted(p for p in RECIPES.glob("*/*.yaml")
                       if p.parent.name != "accelerate" and not p.name.startswith("sft-"))
SFT_RECIPES = sorted(RECIPES.glob("*/sft-*.yaml"))
HUB_DATA = {"trl-lib/tldr-preference", "trl-lib/tldr", "HuggingFaceH4/ultrafeedback_binarized"}
TINY = {"max_steps": "2", "max_length": "64", "max_prompt_length": "40", "max_completion_length": "8"}


def hub_like_dataset(root: Path, splits: dict[str, list[dict]]) -> Path:
    """A dataset folder as the Hub stores these datasets: data/<split>-00000-of-00001.parquet and a README whose
    `configs` block names the default configuration's splits (read by datasets.load_dataset, like the Hub)."""
    import datasets

    (root / "data").mkdir(parents=True)
    files = ""
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        files += f"  - split: {split}\n    path: data/{split}-*\n"
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n")
    return root


def _post(i: int, split: str) -> str:
    return f"SUBREDDIT: r/reviews\n\nTITLE: item {i}\n\nPOST: Write a short review of item {i} ({split}).\n\nTL;DR:"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """Local stand-ins for the recipes' datasets, in their real schemas and split names."""
    root = tmp_path_factory.mktemp("hub")

    def pair(i, split):
        return {"prompt": _post(i, split), "chosen": " Great, I enjoyed it.", "rejected": " Terrible and boring."}

    def uf(i, split):
        prompt = f"Write a short review of item {i} ({split})."
        return {"prompt": prompt, "prompt_id": f"{i:064x}",
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Lovely, great."}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Bad."}],
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Lovely, great."}],
                "score_chosen": 8.0, "score_rejected": 4.0}

    return {
        "trl-lib/tldr-preference": hub_like_dataset(root / "tldr-preference", {
            "train": [pair(i, "train") for i in range(16)], "validation": [pair(i, "held out") for i in range(6)]}),
        "trl-lib/tldr": hub_like_dataset(root / "tldr", {
            split: [{"prompt": _post(i, split if split == "train" else "held out"), "completion": " Great."}
                    for i in range(16 if split == "train" else 6)] for split in ("train", "validation", "test")}),
        "HuggingFaceH4/ultrafeedback_binarized": hub_like_dataset(root / "ultrafeedback_binarized", {
            "train_prefs": [uf(i, "train") for i in range(16)], "test_prefs": [uf(i, "held out") for i in range(6)],
            "train_sft": [uf(i, "sft") for i in range(2)]}),
    }


def _data_overrides(recipe: Path, hub: dict[str, Path]) -> list[str]:
    """--<source> <local folder> for each of the recipe's hub datasets (their splits stay the recipe's)."""
    data = yaml.safe_load(recipe.read_text())
    flags = []
    for key in ("dataset", "prompts", "eval_prompts", "eval_dataset"):
        if data.get(key):
            assert data[key] in HUB_DATA, f"{recipe.name}: {key} {data[key]} has no local stand-in"
            flags += [f"--{key}", str(hub[data[key]])]
    return flags


def test_recipes_are_valid_configs_with_the_expected_keys():
    assert len(TRAIN_RECIPES) == 8 and len(SFT_RECIPES) == 2
    for recipe in TRAIN_RECIPES:
        values = read_config_file(recipe)  # unknown keys or wrong types are errors
        config = HyPOConfig(**values)
        full_8gpu = recipe.stem.endswith("-full")  # sharded full fine-tuning: bf16 GPUs only, stated
        lora = recipe.stem.endswith("-lora")
        # float32 master weights: no bf16 update is lost; LoRA's dtype is its frozen base's (adapters: float32)
        assert config.dtype == ("bfloat16" if lora else "float32"), recipe.name
        assert config.mixed_precision == ("bf16" if full_8gpu else "auto"), recipe.name
        # 8B: activations of 8 rows of 1,024 tokens are recomputed (`hypo plan`)
        assert config.gradient_checkpointing == (full_8gpu or lora) and config.use_peft == lora
        assert config.dataset in HUB_DATA and config.eval_dataset in HUB_DATA, recipe.name
    pairs = {}  # DPO and HyPO of a setting differ only in the method and the online term's keys
    for recipe in TRAIN_RECIPES:
        values = read_config_file(recipe)
        method, key = values.pop("method"), (recipe.parent.name, recipe.stem.split("-", 1)[1])
        pairs.setdefault(key, {})[method] = {
            k: v for k, v in values.items()
            if k not in ("kl_coef", "num_generations", "per_device_prompt_batch_size", "output_dir")}
    assert len(pairs) == 4
    for methods in pairs.values():
        assert methods["dpo"] == methods["hypo"]


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    one, eight = (load_config_from_file(str(RECIPES / "accelerate" / name)) for name in ("1gpu.yaml", "8gpu-ddp.yaml"))
    from accelerate import DistributedType
    from accelerate.utils import PrecisionType

    assert (one.distributed_type, one.num_processes) == (DistributedType.NO, 1)
    assert (eight.distributed_type, eight.num_processes) == (DistributedType.MULTI_GPU, 8)
    assert one.mixed_precision == eight.mixed_precision == PrecisionType.NO  # hypo's mixed_precision decides


def test_sharded_accelerate_configs_match_the_full_fine_tuning_recipes():
    from accelerate import DistributedType
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import PrecisionType

    fsdp2 = load_config_from_file(str(RECIPES / "accelerate" / "8gpu-fsdp2.yaml"))
    assert (fsdp2.distributed_type, fsdp2.num_processes, fsdp2.mixed_precision) == \
        (DistributedType.FSDP, 8, PrecisionType.NO)
    assert fsdp2.fsdp_config["fsdp_version"] == 2  # hypo refuses FSDP1 for the reference
    assert fsdp2.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # one group per decoder layer
    assert fsdp2.fsdp_config["fsdp_activation_checkpointing"] is False  # the recipe's gradient_checkpointing does it
    zero3 = load_config_from_file(str(RECIPES / "accelerate" / "8gpu-zero3.yaml"))
    assert (zero3.distributed_type, zero3.num_processes) == (DistributedType.DEEPSPEED, 8)
    ds_file = RECIPES.parent / zero3.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] == "auto"
    for recipe in ("dpo-full.yaml", "hypo-full.yaml"):  # DeepSpeed's micro-batch and accumulation are the recipe's
        config = HyPOConfig(**read_config_file(RECIPES / "ultrafeedback-llama3-8b" / recipe))
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
            (config.per_device_train_batch_size, config.gradient_accumulation_steps)
        assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 128


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_train_recipe_dry_run(recipe, hub, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", str(recipe), "--model_name_or_path", str(tiny_model_dir), *_data_overrides(recipe, hub),
            "--output_dir", str(out), *(item for pair in TINY.items() for item in (f"--{pair[0]}", pair[1]))]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]  # logging_steps 10: the last step is logged
    assert last["step"] == 2 and ("loss/kl" in last) == recipe.name.startswith("hypo-")
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert samples and all("held out" in s["prompt"] for s in samples)  # the recipe's held-out split was read
    config = json.loads((out / "config.json").read_text())
    assert config["dataset_split"] in ("train", "train_prefs") and (out / "model" / "config.json").is_file()
    if config["use_peft"]:  # the bf16 base's float32 adapters learned through the checkpointed layers
        assert (out / "model" / "adapter").is_dir()
        from safetensors.torch import load_file

        adapter = load_file(str(out / "model" / "adapter" / "adapter_model.safetensors"))
        b_weights = [t for name, t in adapter.items() if "lora_B" in name]  # 0 at the start
        assert b_weights and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in b_weights)
    if config["mixed_precision"] == "bf16":  # bf16 compute on float32 master weights: the small steps are kept
        assert changed_fraction(tiny_model_dir, out / "model") > 0.5  # a bf16 weight would keep none of them


def changed_fraction(before: Path, after: Path) -> float:
    """Fraction of weight elements that differ between two saved models; both must hold float32 weights.
    With learning rate 5e-7, an AdamW step moves a weight of ~0.02 by ~5e-7: representable in float32, below
    bfloat16's spacing there (0.02 x 2**-8 = 7.8e-5)."""
    from safetensors.torch import load_file

    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in (*a.values(), *b.values()))
    changed = sum(int((a[k] != b[k]).sum()) for k in a)
    return changed / sum(t.numel() for t in a.values())


@pytest.mark.parametrize("recipe", SFT_RECIPES, ids=lambda p: p.stem)
def test_sft_recipe_dry_run(recipe, hub, tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "sft"
    argv = ["sft", "--config", str(recipe), "--model_name_or_path", str(tiny_model_dir), *_data_overrides(recipe, hub),
            "--output_dir", str(out), "--max_steps", "2", "--max_length", "128"]
    assert main(argv) == 0
    assert (out / "model" / "config.json").is_file() and (out / "model" / "README.md").is_file()
    assert json.loads((out / "sft_config.json").read_text())["dataset_split"] == "train"

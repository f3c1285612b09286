"""hypo: Hybrid Preference Optimization (HyPO) for Hugging Face causal LMs.

HyPO (Song, Swamy, Singh, Bagnell, Sun, arXiv 2406.01462) keeps the DPO loss on offline preference
pairs and adds `kl_coef * KL(pi || pi_ref)`, estimated on fresh samples from the current policy for
unlabeled prompts (no labels, no reward model).

    from hypo import HyPOConfig, train
    result = train(HyPOConfig(method="hypo", kl_coef=0.05))

or, with objects in memory (TRL's DPOTrainer shape):

    from hypo import HyPOConfig, HyPOTrainer
    trainer = HyPOTrainer(model=model, args=HyPOConfig(kl_coef=0.05), processing_class=tokenizer,
                          train_dataset=pairs, eval_prompts=held_out)
    trainer.train(); trainer.evaluate(); trainer.save_model("out")
"""

from hypo.config import HyPOConfig
from hypo.objective.losses import dpo_loss, kl_estimates, kl_surrogate, leave_one_out_advantages

__version__ = "0.1.0"
__all__ = ["HyPOConfig", "HyPOTrainer", "train", "dpo_loss", "kl_surrogate", "kl_estimates",
           "leave_one_out_advantages"]


def train(config: HyPOConfig):
    """Run training as configured: `HyPOTrainer(args=config).train()` (see `hypo.training.trainer.train`)."""
    from hypo.training.trainer import train as _train

    return _train(config)


def __getattr__(name: str):
    """`HyPOTrainer`, imported when first used (`import hypo` loads no transformers)."""
    if name == "HyPOTrainer":
        from hypo.training.hypo_trainer import HyPOTrainer

        return HyPOTrainer
    raise AttributeError(f"module 'hypo' has no attribute {name!r}")

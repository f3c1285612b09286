"""hypo: Hybrid Preference Optimization (HyPO) for Hugging Face causal LMs.

HyPO (Song, Swamy, Singh, Bagnell, Sun, arXiv 2406.01462) keeps the DPO loss on offline preference
pairs and adds `kl_coef * KL(pi || pi_ref)`, estimated on fresh samples from the current policy for
unlabeled prompts (no labels, no reward model).

    from hypo import HyPOConfig, train
    result = train(HyPOConfig(method="hypo", kl_coef=0.05))
"""

from hypo.config import HyPOConfig
from hypo.objective.losses import dpo_loss, kl_estimates, kl_surrogate, leave_one_out_advantages

__version__ = "0.1.0"
__all__ = ["HyPOConfig", "train", "dpo_loss", "kl_surrogate", "kl_estimates", "leave_one_out_advantages"]


def train(config: HyPOConfig):
    """Run training as configured; see `hypo.training.trainer.train`."""
    from hypo.training.trainer import train as _train

    return _train(config)

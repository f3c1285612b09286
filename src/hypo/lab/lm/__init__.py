"""The language-model lab on the embedded model: the DPO / HyPO / RLHF grid (`grid`) and its RLHF baseline
(`rlhf`: a reward model, then TRL's RLOO)."""

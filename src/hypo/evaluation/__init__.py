"""Measuring a model: held-out samples (reverse KL, judged win rate: `held_out`), held-out pairs (`pairs`),
judges (`judges`, `llm_judge`), statistics (`stats`), reports (`report`) and exports for standard evaluators
(`export`)."""

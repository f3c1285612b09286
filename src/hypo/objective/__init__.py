"""The math of the objective, in pure torch: the offline losses and the online KL estimator (`losses`), and
token and sequence log-probabilities from a model's logits (`logprobs`). docs/design.md states the objective."""

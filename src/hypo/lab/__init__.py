"""Coverage lab: experiments on when offline preference data suffices (arXiv 2406.01462).

`hypo lab bandit` (exact bandits: `bandit`, `regimes`, `training`, `experiments`), `hypo lab lm` (the
language-model grid: `lm`) and `hypo lab rlhf` (the online-RLHF baseline: `rlhf`); the command line is
`hypo.lab.cli`.
"""

"""Coverage lab: experiments on when offline preference data suffices (arXiv 2406.01462).

`hypo lab bandit` (exact bandits: `bandit`), `hypo lab lm` and `hypo lab rlhf` (the embedded language model:
`lm`), `hypo lab partial-coverage` (a synthetic language built for partial coverage: `partial_coverage`); the
command line is `hypo.lab.cli`.
"""

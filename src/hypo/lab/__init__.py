"""Coverage lab: small exact experiments on when offline preference data suffices (arXiv 2406.01462).

`hypo lab bandit` runs `run_lab`; the math is in `hypo.lab.bandit`, the sweeps in `hypo.lab.experiments`.
"""

from __future__ import annotations


def run_lab(argv: list[str]) -> int:
    """`hypo lab ...` (see `hypo lab --help`); torch and matplotlib are imported only when it runs."""
    from hypo.lab.experiments import run_lab as _run_lab

    return _run_lab(argv)

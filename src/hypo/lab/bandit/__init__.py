"""The exact contextual-bandit lab: bandits and objectives (`problem`), coverage regimes and gold worlds
(`regimes`), full-batch training (`training`), and the sweeps with their tables (`experiments`)."""

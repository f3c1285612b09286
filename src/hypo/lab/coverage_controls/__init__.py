"""The coverage-controls lab (docs/coverage-lab-controls.md): the partial-coverage language in several worlds,
under partial and full coverage, DPO and HyPO each in four settings read by label-free rules: the grid and its
runs (`experiment`), the pure functions of the preregistered analysis (`analysis`), and the tables (`report`)."""

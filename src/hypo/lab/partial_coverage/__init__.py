"""The partial-coverage lab: a synthetic language (`language`), its world model (`world`), the preregistered
grid (`experiment`), and its statistics (`analysis`) and report (`report`)."""

"""Where and how a run executes: the accelerate set-up (`accelerator`), compute precision (`precision`), and
what sharded runs must do together (`distributed`). No training logic lives here."""

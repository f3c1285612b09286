"""Training: the loop (`trainer`), its set-up (`setup`), the step math (`steps`), backward passes under each
engine (`backward`), stopping (`stopping`), checkpoints, input checks (`preflight`), metrics (`tracking`), the
model card and upload (`hub`), and the TRL-based SFT step and baselines (`sft`, `trl_args`)."""

"""transformers' callbacks in hypo's loop: control flags are reset where a Trainer resets them, a callback may
return a new control, and the kwargs are CallbackHandler's."""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl

from hypo.config import HyPOConfig
from hypo.training.callbacks import TrainingEvents


class Seen(TrainerCallback):
    def __init__(self):
        self.calls = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.calls.append(("step_begin", sorted(kwargs)))
        control.should_save = True  # a request made at the start of a step holds until that step's end

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.calls.append(("log", logs))
        replaced = TrainerControl()
        replaced.should_training_stop = True
        return replaced


def test_events_reset_control_and_accept_a_returned_control():
    seen = Seen()
    events = TrainingEvents([seen, TrainerCallback], HyPOConfig())
    assert len(events.callbacks) == 2  # a class is instantiated
    events.control.should_log = events.control.should_evaluate = True
    events.step_begin(1)
    assert events.control.should_save and not events.control.should_log and not events.control.should_evaluate
    assert seen.calls[0] == ("step_begin", ["eval_dataloader", "lr_scheduler", "model", "optimizer",
                                            "processing_class", "train_dataloader"])
    events.log({"loss": 0.5}, 1)
    assert seen.calls[1] == ("log", {"loss": 0.5}) and events.state.log_history == [{"loss": 0.5, "step": 1}]
    assert events.control.should_training_stop  # the control the callback returned
    assert events.remove(Seen) is seen and len(events.callbacks) == 1


class FakeAccelerator:
    """Two processes; the other one set should_save (the sum of an all-reduce over both)."""

    num_processes, device = 2, "cpu"

    def reduce(self, tensor, reduction):
        import torch

        return tensor + torch.tensor([0.0, 1.0, 0.0, 0.0])


def test_a_flag_set_on_any_process_holds_on_all():
    events = TrainingEvents([], HyPOConfig())
    events.agree(FakeAccelerator())
    assert events.control.should_save and not events.control.should_training_stop and not events.control.should_log

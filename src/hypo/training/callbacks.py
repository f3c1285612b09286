"""transformers' `TrainerCallback`s in hypo's loop: the events a `Trainer` calls, at the points it calls them, with
transformers' own `TrainerState` and `TrainerControl`.

Events: `on_init_end` (the trainer is built), `on_train_begin`, `on_step_begin` / `on_step_end` (each optimizer
step), `on_log` (each record written to metrics.jsonl: training steps and evaluations), `on_evaluate` (each held-out
evaluation, with its `eval_*` metrics), `on_save` (each checkpoint), `on_train_end`. Each callback gets
`(args, state, control, model=, processing_class=, optimizer=, lr_scheduler=, train_dataloader=None,
eval_dataloader=None, **event kwargs)` as from transformers' `CallbackHandler`; `args` is the run's `HyPOConfig`
(TRL's names: `output_dir`, `max_steps`, `logging_steps`, `learning_rate`, ...). The loop honours `control`:
`should_training_stop` ends the run cleanly after the step (final model saved and evaluated, as at a normal end),
`should_save` saves a checkpoint of the step, `should_evaluate` evaluates it, `should_log` logs it; a flag set on any
process holds on all of them (`agree`). There are no epoch events (the loop counts optimizer steps over endless shuffled batches).

transformers' `CallbackHandler` is not used as is: it warns unless a `DefaultFlowCallback` is present, which decides
logging, evaluation and saving from `TrainingArguments` fields that hypo's loop decides itself.
"""

from __future__ import annotations

from typing import Any


class TrainingEvents:
    """The callbacks of one trainer and the `TrainerState` / `TrainerControl` they see."""

    def __init__(self, callbacks, args) -> None:
        from transformers import TrainerControl, TrainerState

        self.callbacks: list[Any] = []
        for callback in callbacks or []:
            self.add(callback)
        self.args = args
        self.state = TrainerState()
        self.control = TrainerControl()
        self.objects: dict[str, Any] = {"model": None, "processing_class": None, "optimizer": None,
                                        "lr_scheduler": None, "train_dataloader": None, "eval_dataloader": None}

    def add(self, callback) -> None:
        """A `TrainerCallback` instance, or its class (instantiated without arguments)."""
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def remove(self, callback) -> Any:
        """Remove a callback (an instance, or the first of a class) and return it; None when absent."""
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    def call(self, event: str, **kwargs) -> None:
        """Call `event` on every callback in order; a callback may return a new `TrainerControl`."""
        for callback in self.callbacks:
            result = getattr(callback, event)(self.args, self.state, self.control, **self.objects, **kwargs)
            if result is not None:
                self.control = result

    def bind(self, run) -> None:
        """What the callbacks receive, once the run is set up: the model (unwrapped), the tokenizer, the optimizer
        and the schedule; and the state's fixed fields."""
        self.objects.update(model=run.accelerator.unwrap_model(run.policy), processing_class=run.tokenizer,
                            optimizer=run.optimizer, lr_scheduler=run.scheduler)
        config, state = run.config, self.state
        state.max_steps, state.logging_steps = run.total_steps, config.logging_steps
        state.eval_steps, state.save_steps = config.eval_steps, config.save_steps
        state.train_batch_size = config.per_device_train_batch_size
        state.num_train_epochs = config.num_train_epochs if config.max_steps == -1 else 0
        state.is_local_process_zero = run.accelerator.is_local_main_process
        state.is_world_process_zero = run.accelerator.is_main_process
        state.global_step = run.start_step
        self._pairs_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * \
            run.accelerator.num_processes / len(run.data.pairs)

    def train_begin(self) -> None:
        self.control.should_training_stop = False
        self.call("on_train_begin")

    def step_begin(self, step: int) -> None:
        self.control.should_log = self.control.should_evaluate = self.control.should_save = False
        self.call("on_step_begin")

    def step_end(self, step: int) -> None:
        self.state.global_step, self.state.epoch = step, step * self._pairs_per_step
        self.call("on_step_end")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """A record of metrics.jsonl (the run logger's listener, on the main process)."""
        self.state.log_history.append({**metrics, "step": step})
        self.control.should_log = False
        self.call("on_log", logs=dict(metrics))

    def evaluate(self, metrics: dict[str, float]) -> None:
        self.control.should_evaluate = False
        self.call("on_evaluate", metrics=dict(metrics))

    def save(self) -> None:
        self.control.should_save = False
        self.call("on_save")

    def train_end(self) -> None:
        self.call("on_train_end")

    def agree(self, accelerator) -> None:
        """Make every process hold each flag of `control` that a callback set on any process (one all-reduce; every
        process must call it): the loop's decisions on them (log, save, evaluate, stop) are collective, and some
        events (`on_log`) run on the main process only."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        import torch

        names = ("should_training_stop", "should_save", "should_evaluate", "should_log")
        flags = torch.tensor([float(getattr(self.control, name)) for name in names], device=accelerator.device)
        for name, count in zip(names, accelerator.reduce(flags, "sum").tolist(), strict=True):
            setattr(self.control, name, count > 0)

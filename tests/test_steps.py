"""The step helpers' plumbing: prompt batches joined for one sampling call, and calls run in a background thread
(the loop-level checks of the samples are in test_train.py)."""

import threading
import time

import pytest
import torch

from hypo.training.steps import BackgroundCalls, join_prompt_batches


def test_prompt_batches_join_left_padded_to_the_longest():
    pad = 0
    a = {"prompt_input_ids": torch.tensor([[5, 6]]), "prompt_attention_mask": torch.tensor([[1, 1]])}
    b = {"prompt_input_ids": torch.tensor([[pad, 7, 8], [9, 10, 11]]),
         "prompt_attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    joined = join_prompt_batches([a, b], pad)
    assert torch.equal(joined["prompt_input_ids"], torch.tensor([[pad, 5, 6], [pad, 7, 8], [9, 10, 11]]))
    assert torch.equal(joined["prompt_attention_mask"], torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]]))
    assert join_prompt_batches([b], pad) is b  # one batch: the call gets it as it is


def test_background_calls_run_in_order_in_another_thread_and_hand_errors_to_the_caller():
    threads, started = [], []

    def work(job):
        started.append(job)
        threads.append(threading.current_thread().name)
        time.sleep(0.01)
        if job == "bad":
            raise ValueError("server gone")
        return job * 2

    calls = BackgroundCalls(work, [1, 2, "bad", 3])
    assert calls.result(1) == 4 and calls.result(0) == 2  # waits for each, in any order asked
    for i in (2, 3):  # the failed job and every later one raise in the caller; later jobs never run
        with pytest.raises(ValueError, match="server gone"):
            calls.result(i)
    assert started == [1, 2, "bad"] and set(threads) == {"hypo-sampling"}

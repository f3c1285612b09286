"""Batches of tokenized items: padding, collators, and the seeded endless order the loop draws from."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest one, on the left or the right.

    Shape: returns ``input_ids`` and ``attention_mask``, both (B, T) long, T = longest sequence.
    """
    width = max((len(seq) for seq in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


class PromptCollator:
    """Batch prompt items: prompts left-padded so generation continues right after them.

    Shape: ``prompt_input_ids`` / ``prompt_attention_mask`` (B, P), ``index`` (B,).
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (set tokenizer.pad_token)")
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        prompt_ids, prompt_mask = pad_sequences(
            [item["prompt_input_ids"] for item in items], self.pad_token_id, left=True
        )  # (B, P)
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)  # (B,)
        return {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask, "index": index}


class PairCollator(PromptCollator):
    """Batch preference items: prompts left-padded, completions right-padded.

    Shape: ``prompt_*`` (B, P), ``chosen_*`` (B, C), ``rejected_*`` (B, R), ``index`` (B,);
    attention masks are 0/1 long tensors.
    """

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        for name in ("chosen", "rejected"):
            ids, mask = pad_sequences(
                [item[f"{name}_input_ids"] for item in items], self.pad_token_id, left=False
            )  # (B, C) / (B, R)
            batch[f"{name}_input_ids"] = ids
            batch[f"{name}_attention_mask"] = mask
        return batch


def pair_length(item: dict) -> int:
    """The tokens a pair adds to the padded width of its batch: its prompt and its longer completion."""
    return len(item["prompt_input_ids"]) + max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"]))


def prompt_length(item: dict) -> int:
    return len(item["prompt_input_ids"])


def length_grouped(order: list[int], lengths: Sequence[int], group_size: int) -> list[int]:
    """`order` cut into consecutive groups of `group_size`, each sorted by length, longest first, and the
    longest item of all moved to the front (transformers' `get_length_grouped_indices`: a run that runs out of
    memory does so at its first batch). Batches taken in turn from the result hold rows of similar lengths.

    Example: order [0, 1, 2, 3, 4, 5], lengths [1, 9, 2, 8, 7, 3], groups of 3 -> [1, 2, 0, 3, 4, 5]:
    groups [1, 2, 0] and [3, 4, 5] (each longest first); 1 (length 9) is already first.
    """
    groups = [sorted(order[i : i + group_size], key=lambda j: lengths[j], reverse=True)
              for i in range(0, len(order), group_size)]
    longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
    groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return [i for group in groups for i in group]


class ShuffledBatches:
    """Endless batches of `items` in a seeded random order, reshuffled every epoch, for one process of
    `num_processes`. The order is the one a shuffling `DataLoader` with a generator seeded with `seed` draws,
    epoch after epoch from the same generator (tested equal); full batches only. Process i takes global
    batches i, i + P, i + 2P, ... The position is a number of batches, so a resumed run continues exactly
    where it stopped: `start` is how many batches this process has already taken.

    With `lengths` (one per item, e.g. `pair_length`), each epoch's order is then grouped by length
    (`length_grouped`, groups of `GROUP_BATCHES` global batches): the same draws, so the order still follows
    from the seed and the epoch alone, and a resumed run still continues exactly.
    """

    GROUP_BATCHES = 50  # transformers' LengthGroupedSampler's megabatch, in batches of every process

    def __init__(self, items: list[dict], batch_size: int, collate_fn, *, seed: int, what: str,
                 process_index: int = 0, num_processes: int = 1, device: torch.device | str = "cpu",
                 start: int = 0, lengths: Sequence[int] | None = None) -> None:
        self.batches_per_epoch = len(items) // batch_size // num_processes * num_processes
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(items)} {what} is fewer than one batch of {batch_size} on each of "
                             f"{num_processes} process(es)")
        if lengths is not None and len(lengths) != len(items):
            raise ValueError(f"{len(lengths)} lengths for {len(items)} {what}")
        self.items, self.batch_size, self.collate_fn, self.device = items, batch_size, collate_fn, device
        self.seed, self.process_index, self.num_processes = seed, process_index, num_processes
        self.lengths = lengths
        self.position = start
        self._generator, self._epoch, self._order = torch.Generator().manual_seed(seed), -1, []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch < self._epoch:  # only forward in normal use; restart the draws otherwise
            self._generator, self._epoch = torch.Generator().manual_seed(self.seed), -1
        while self._epoch < epoch:
            # the draws of a shuffling DataLoader's epoch: a base seed for its workers, the order, and the
            # (empty) remainder its RandomSampler draws before it stops
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)
            self._order = torch.randperm(len(self.items), generator=self._generator).tolist()
            torch.randperm(len(self.items), generator=self._generator)
            if self.lengths is not None:
                group = self.GROUP_BATCHES * self.batch_size * self.num_processes
                self._order = length_grouped(self._order, self.lengths, group)
            self._epoch += 1
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        index = self.position * self.num_processes + self.process_index  # global batch index
        self.position += 1
        order = self._epoch_order(index // self.batches_per_epoch)
        start = (index % self.batches_per_epoch) * self.batch_size
        batch = self.collate_fn([self.items[i] for i in order[start : start + self.batch_size]])
        return {key: value.to(self.device) for key, value in batch.items()}

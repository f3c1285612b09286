"""`ShuffledBatches`: the order of a shuffling DataLoader with the same seeded generator, every epoch;
sharding across processes; and a start position that continues exactly where a run stopped."""

import pytest
import torch
from torch.utils.data import DataLoader

from hypo.data.batches import ShuffledBatches


def _collate(rows):
    return {"x": torch.tensor([r["i"] for r in rows])}


@pytest.mark.parametrize(("n", "batch_size"), [(37, 4), (36, 4), (8, 2)])
def test_same_order_as_a_shuffling_dataloader_over_epochs(n, batch_size):
    items = [{"i": k} for k in range(n)]
    loader = DataLoader(items, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(42))
    expected = [b["x"].tolist() for _ in range(3) for b in loader]
    batches = ShuffledBatches(items, batch_size, _collate, seed=42, what="rows")
    assert [next(batches)["x"].tolist() for _ in expected] == expected
    assert batches.batches_per_epoch == n // batch_size


def test_start_continues_where_a_run_stopped_and_processes_split_the_batches():
    items = [{"i": k} for k in range(37)]
    whole = ShuffledBatches(items, 4, _collate, seed=1, what="rows")
    expected = [next(whole)["x"].tolist() for _ in range(20)]
    resumed = ShuffledBatches(items, 4, _collate, seed=1, what="rows", start=13)
    assert [next(resumed)["x"].tolist() for _ in range(7)] == expected[13:]
    shards = [ShuffledBatches(items, 4, _collate, seed=1, what="rows", process_index=i, num_processes=2)
              for i in range(2)]
    assert shards[0].batches_per_epoch == 8  # 9 batches, rounded down to a multiple of the processes
    interleaved = [next(shards[t % 2])["x"].tolist() for t in range(6)]
    assert interleaved == expected[:6]


def test_too_few_rows_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="3 pairs is fewer than one batch of 4"):
        ShuffledBatches([{"i": k} for k in range(3)], 4, _collate, seed=0, what="pairs")


def _padded_fraction(batches, steps):
    """Padding tokens of `steps` batches of rows {"n": length}, each padded to its longest row."""
    pad = total = 0
    for _ in range(steps):
        lengths = next(batches)["n"].tolist()
        pad += sum(max(lengths) - n for n in lengths)
        total += max(lengths) * len(lengths)
    return pad / total


def _lengths(rows):
    return {"n": torch.tensor([r["n"] for r in rows]), "x": torch.tensor([r["i"] for r in rows])}


def test_length_grouped_batches_pad_less_and_resume_exactly():
    gen = torch.Generator().manual_seed(0)
    items = [{"i": k, "n": int(n)} for k, n in enumerate(torch.randint(10, 800, (400,), generator=gen))]
    lengths = [item["n"] for item in items]
    plain = ShuffledBatches(items, 4, _lengths, seed=3, what="rows")
    grouped = ShuffledBatches(items, 4, _lengths, seed=3, what="rows", lengths=lengths)
    steps = 2 * plain.batches_per_epoch
    plain_pad, grouped_pad = _padded_fraction(plain, steps), _padded_fraction(grouped, steps)
    assert plain_pad > 0.3 and grouped_pad < 0.05  # measured here: 0.36 and 0.014
    again = ShuffledBatches(items, 4, _lengths, seed=3, what="rows", lengths=lengths)
    order = [next(again)["x"].tolist() for _ in range(steps)]
    epoch = [i for batch in order[:again.batches_per_epoch] for i in batch]
    assert sorted(epoch) == list(range(400))  # every row once per epoch
    assert max(items[i]["n"] for i in order[0]) == max(lengths)  # the longest row comes first
    resumed = ShuffledBatches(items, 4, _lengths, seed=3, what="rows", lengths=lengths, start=137)
    assert [next(resumed)["x"].tolist() for _ in range(steps - 137)] == order[137:]
    shards = [ShuffledBatches(items, 4, _lengths, seed=3, what="rows", lengths=lengths, process_index=i,
                              num_processes=2) for i in range(2)]
    taken = [next(shards[t % 2])["x"].tolist() for t in range(2 * shards[0].batches_per_epoch // 2)]
    assert sorted(i for batch in taken for i in batch) == list(range(400))  # two processes share each epoch


def test_the_default_order_is_not_grouped():
    items = [{"i": k, "n": k % 7} for k in range(40)]
    plain = ShuffledBatches(items, 4, _collate, seed=5, what="rows")
    grouped = ShuffledBatches(items, 4, _collate, seed=5, what="rows", lengths=[k % 7 for k in range(40)])
    assert [next(plain)["x"].tolist() for _ in range(10)] != [next(grouped)["x"].tolist() for _ in range(10)]
    with pytest.raises(ValueError, match="3 lengths for 40 rows"):
        ShuffledBatches(items, 4, _collate, seed=5, what="rows", lengths=[1, 2, 3])

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

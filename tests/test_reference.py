"""Per-pair caches: rows kept by pair index, read back in any batch order."""

import torch

from mva_lightning.training.reference import PairCache, as_logps, reference_rows


def test_rows_are_read_back_by_pair_index_in_any_batch_order():
    # 5 pairs in two batches, out of order; the value of pair i is (10 i, -i)
    batches = [{"index": torch.tensor([3, 0])}, {"index": torch.tensor([4, 1, 2])}]
    computed = []

    def compute(batch):
        computed.append(batch["index"].tolist())
        i = batch["index"].double()
        return torch.stack([10 * i, -i], dim=1)

    cache = PairCache()
    assert ("v", "train") not in cache
    rows = cache.fill(("v", "train"), 5, batches, compute)
    assert computed == [[3, 0], [4, 1, 2]] and rows.dtype == torch.float32
    assert ("v", "train") in cache
    got = cache.rows(("v", "train"), torch.tensor([2, 4, 0]))
    assert got.tolist() == [[20.0, -2.0], [40.0, -4.0], [0.0, 0.0]]
    cache.clear()
    assert ("v", "train") not in cache


def test_logps_and_rows_are_inverse_layouts():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])  # [chosen x 3; rejected x 3]
    rows = reference_rows(logps)
    assert rows.tolist() == [[-1.0, -4.0], [-2.0, -5.0], [-3.0, -6.0]]  # (chosen, rejected)
    assert torch.equal(as_logps(rows), logps)

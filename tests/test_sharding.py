"""A sweep sharded over processes: which candidates a rank scores, merging every rank's scores
back into candidate order, and a 2-rank sweep (threads standing in for processes) that writes
what one process writes, resumes from every rank's cache and fails on every rank at once."""

import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import VALUES, make_policy

from mva_lightning.model import lora
from mva_lightning.sweep.objectives import Objective, Scores
from mva_lightning.sweep.sweep import Shard, extrapolate, merge_shards, shard_of

TIMING = {"seconds", "candidates_per_s", "scored", "skipped"}
GRID = {"mode": "grid", "values": [0.5, 1.0, 1.5]}  # 9 candidates, and the base
ITEMS = np.linspace(-1.0, 1.0, 9)


class Smooth(Objective):
    """Per-item scores that are smooth in w: a front of several points, and intervals."""

    def __init__(self, split: str = "val", fail: bool = False) -> None:
        self.split, self.fail = split, fail

    def validate(self, datamodule, values):
        pass

    def data_fingerprint(self, datamodule, values):
        return "smooth"

    def score(self, policy, datamodule, values):
        if self.fail:
            raise ValueError("simulated scoring failure")
        a, b = (lora.get_weights(policy)[v] for v in values)
        shift = 0.1 if self.split == "test" else 0.0
        per_item = {
            "helpful": np.tanh(a - 0.5 * b * b + ITEMS + shift).tolist(),
            "harmless": np.tanh(b - 0.5 * a * a + ITEMS).tolist(),
        }
        return Scores({v: float(np.mean(s)) for v, s in per_item.items()}, per_item)

    def for_split(self, split):
        return Smooth(split, self.fail)


@pytest.fixture(scope="module")
def policies():
    return [make_policy()[0] for _ in range(2)]  # one per rank: equal value vectors


def _sweep(policy, out: Path, shard: Shard | None = None, objective: Objective | None = None):
    return extrapolate(
        policy,
        None,
        VALUES,
        GRID,
        objective or Smooth(),
        out,
        report_split="test",
        progress=False,
        bootstrap={"resamples": 50, "seed": 3},
        shard=shard,
    )


def _ranks(run, world: int = 2) -> list:
    """``run(shard)`` on ``world`` threads, one a rank, with an all-gather between them.

    Returns:
        Per rank, what ``run`` returned or raised.
    """
    slots: list = [None] * world
    barrier = threading.Barrier(world, timeout=60)  # a rank that skips a gather: fails, no hang

    def gather_for(rank: int):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()  # every rank has read before any writes its next object
            return out

        return gather

    out: list = [None] * world

    def target(rank: int) -> None:
        try:
            out[rank] = run(Shard(rank, world, gather_for(rank)))
        except Exception as error:
            out[rank] = error

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return out


def _manifest(out: Path) -> dict:
    data = json.loads((out / "pareto.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING}


@pytest.mark.parametrize("n,world", [(10, 2), (9, 2), (7, 3), (2, 4), (5, 1)])
def test_each_rank_gets_a_disjoint_share_covering_every_candidate(n, world):
    items = [(0.1 * i, 1.0) for i in range(n)]
    shares = [shard_of(items, r, world) for r in range(world)]
    assert sorted(w for s in shares for w in s) == sorted(items)  # all, none twice
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert shares[0][0] == items[0]  # the base (first in the sweep's list) is rank zero's
    assert all(s == [w for w in items if items.index(w) % world == r] for r, s in enumerate(shares))


def test_merging_the_shares_restores_candidate_order_with_per_item_scores():
    order = [(0.0, 0.0), (0.5, 1.0), (1.0, 0.5), (1.5, 1.5), (2.0, 0.0)]
    scores = {w: Scores({"helpful": w[0]}, {"helpful": [w[0], w[1]]}) for w in order}
    # what all_gather_object hands back: each rank's share, pickled and unpickled
    parts = [
        pickle.loads(pickle.dumps({w: scores[w] for w in shard_of(order, r, 2)})) for r in (0, 1)
    ]
    merged = merge_shards(parts, order)
    assert list(merged) == order and merged == scores
    assert all(merged[w].per_item == scores[w].per_item for w in order)
    with pytest.raises(RuntimeError, match=r"no rank returned \[\(0.5, 1.0\), \(1.5, 1.5\)\]"):
        merge_shards(parts[:1], order)  # rank 1's share lost


def test_a_sharded_sweep_writes_what_one_process_writes_and_resumes(policies, tmp_path):
    single = _sweep(policies[0], tmp_path / "one" / "extrapolation")
    assert single.scored == 10 and single.front_size >= 3 and single.intervals  # non-trivial
    out = tmp_path / "two" / "extrapolation"
    zero, other = _ranks(lambda shard: _sweep(policies[shard.rank], out, shard))
    assert other is None, other  # rank 1 returns nothing; rank zero the whole result
    assert not isinstance(zero, Exception), zero
    assert (zero.scored, zero.skipped) == (single.scored, 0)  # summed over the ranks
    assert _manifest(out) == _manifest(tmp_path / "one" / "extrapolation")
    # Each rank cached its own share, in its own folder; nothing else is rank 1's.
    keys = list((out / "scores").iterdir())  # the selection's and the report split's
    assert len(keys) == 2 and all({p.name for p in k.iterdir()} == {"rank0", "rank1"} for k in keys)
    selection = out / "scores" / zero.fingerprint
    assert len(list((selection / "rank0").glob("w_*.json"))) == 5  # the base and 4 candidates
    assert len(list((selection / "rank1").glob("w_*.json"))) == 5
    # Resumed, sharded again: rank 1's lost share is scored again, rank zero's read back.
    for f in (selection / "rank1").glob("w_*.json"):
        f.unlink()
    again = _ranks(lambda shard: _sweep(policies[shard.rank], out, shard))[0]
    assert (again.scored, again.skipped) == (5, 5)
    assert _manifest(out) == _manifest(tmp_path / "one" / "extrapolation")
    # Resumed by one process: every rank's scores are read back.
    alone = _sweep(policies[0], out)
    assert (alone.scored, alone.skipped) == (0, single.scored)
    assert _manifest(out) == _manifest(tmp_path / "one" / "extrapolation")


def test_a_failure_on_one_rank_raises_on_every_rank(policies, tmp_path):
    out = tmp_path / "extrapolation"

    def run(shard: Shard):
        return _sweep(policies[shard.rank], out, shard, Smooth(fail=shard.rank == 1))

    zero, other = _ranks(run)
    assert isinstance(other, ValueError) and "simulated scoring failure" in str(other)
    assert isinstance(zero, RuntimeError), zero
    assert "another process failed (rank 1: ValueError: simulated scoring failure)" in str(zero)
    assert not (out / "pareto.json").exists()

"""Per-pair caches of quantities that never change during training (docs/method.md §2).

The reference log-probs log pi_0(y_w|x), log pi_0(y_l|x) of a pair depend only on the frozen
base model, so they are computed once per (value, split) and read back by pair index at every
step (``train.precompute_reference``); the implicit-reward objective of the sweep keeps its own
cache of the same kind for its held-out pairs. MODPO's margins from frozen value vectors are
cached the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch


class PairCache:
    """Rows of ``width`` floats per pair, filled batch by batch and read back by pair index.

    Batches are dicts whose ``index`` entry, shape (B,), gives each pair's position in its
    split; ``compute(batch)`` returns (B, width) for those pairs.
    """

    def __init__(self) -> None:
        self._rows: dict[Hashable, torch.Tensor] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def clear(self) -> None:
        """Forget every entry (a new stage trains other values)."""
        self._rows.clear()

    def fill(
        self,
        key: Hashable,
        size: int,
        batches: Iterable[dict],
        compute: Callable[[dict], torch.Tensor],
        width: int = 2,
    ) -> torch.Tensor:
        """Compute and keep the (size, width) rows of one split, fp32 on the CPU.

        Args:
            key: What the rows belong to, e.g. ``(value, split)``.
            size: Number of pairs in the split.
            batches: Batches covering the split (each with ``index``).
            compute: Batch -> (B, width) values (no gradient needed).
            width: Floats per pair.

        Returns:
            The cached rows.
        """
        out = torch.zeros(size, width)
        for batch in batches:
            index = batch["index"].cpu()
            out[index] = compute(batch).detach().float().cpu().reshape(len(index), width)
        self._rows[key] = out
        return out

    def rows(self, key: Hashable, index: torch.Tensor) -> torch.Tensor:
        """(B, width) cached rows of the pairs at ``index``."""
        cached = self._rows[key]
        return cached[index.to(cached.device)]


def reference_rows(logps: torch.Tensor) -> torch.Tensor:
    """(2B,) [chosen; rejected] log-probs -> (B, 2) rows (chosen, rejected) per pair."""
    return logps.view(2, -1).T


def as_logps(rows: torch.Tensor) -> torch.Tensor:
    """(B, 2) rows (chosen, rejected) -> (2B,) [chosen; rejected], the inverse of
    :func:`reference_rows`."""
    return torch.cat([rows[:, 0], rows[:, 1]])

"""The preference data module: per-value splits, tokenised once, batched as [chosen; rejected]."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from mva_lightning.data.collate import Tokenized, collate_pairs, tokenize_pair
from mva_lightning.data.sources import Splits

SPLITS = ("train", "val", "test")


def shard(order: Sequence[int], num_replicas: int, rank: int) -> list[int]:
    """Positions rank, rank + W, rank + 2W, ... of ``order`` (W = ``num_replicas``).

    The order is first padded to a multiple of W with its own first entries, as
    ``DistributedSampler`` does, so that every rank runs the same number of steps.
    """
    order = list(order)
    if num_replicas == 1:
        return order
    pad = -len(order) % num_replicas
    order += (order * (pad // max(len(order), 1) + 1))[:pad]
    return order[rank::num_replicas]


class _ShardedSampler(DistributedSampler):
    """Base of our samplers: a seeded global order, this rank's share of it.

    Being ``DistributedSampler`` instances, Lightning keeps them under DDP instead of wrapping
    them in its own distributed sampler (which would reshuffle). Rank r takes every W-th index
    of the global order, so with the per-device batch = global batch / W the W devices together
    process exactly the batches of a single-process run (DPO losses are means over pairs and
    DDP averages gradients, so the updates agree too).
    """

    def __init__(
        self, size: int, seed: int, num_replicas: int, rank: int, epoch_offset: int = 0
    ) -> None:
        # No super().__init__: it wants a dataset and an initialised process group.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"sampler rank {rank} out of range for {num_replicas} replicas")
        self.size, self.seed, self.epoch = size, seed, 0
        self.epoch_offset = epoch_offset
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.drop_last = True, False
        self.num_samples = -(-size // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.start = 0  # where in this rank's share the current pass began (after a resume)
        self.consumed = 0  # indices of this rank's share handed out so far in the current pass
        self._resume: tuple[int, int] | None = None  # (fit epoch, indices to skip) once

    def set_epoch(self, epoch: int) -> None:
        # Lightning passes the fit's epoch; shuffles count epochs from the stage's start.
        if epoch - self.epoch_offset != self.epoch:  # a new epoch: nothing of it used yet
            self.start = self.consumed = 0
        self.epoch = epoch - self.epoch_offset

    @property
    def fit_epoch(self) -> int:
        """The fit's epoch this sampler is set to (``set_epoch``'s argument)."""
        return self.epoch + self.epoch_offset

    def order(self) -> list[int]:
        """This epoch's global order of all ``size`` indices."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        indices = shard(self.order(), self.num_replicas, self.rank)
        start = 0
        if self._resume is not None:  # the first pass after load_state_dict
            epoch, skip = self._resume
            self._resume = None
            start = skip if epoch == self.fit_epoch else 0
        self.start = self.consumed = start
        return self._hand_out(indices[start:])

    def _hand_out(self, indices: list[int]) -> Iterator[int]:
        for i in indices:
            self.consumed += 1
            yield i

    # A resumable sampler (Lightning saves the train loaders' state in its checkpoints, see
    # ResumableDataLoader): the state is the position inside the epoch's share.
    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``{"epoch": fit epoch, "consumed": indices of this rank's share already used}``.

        ``consumed`` defaults to the indices this sampler handed out in its current pass, which
        is what training used when the loader has no workers (workers fetch ahead: the loader
        then passes its own count).
        """
        if self._resume is not None and self._resume[0] == self.fit_epoch:
            epoch, skip = self._resume  # loaded, not yet iterated: still the loaded position
            return {"epoch": epoch, "consumed": skip}
        if consumed is None:
            consumed = self.consumed
        return {"epoch": self.fit_epoch, "consumed": min(int(consumed), self.num_samples)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved position: the next pass over the saved epoch skips the indices
        already used; a saved epoch that was used up resumes at the next epoch's start."""
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        # Lightning calls set_epoch again before the epoch runs; setting it now also covers a
        # loader whose worker processes start fetching as soon as it is iterated.
        self.set_epoch(epoch)
        self._resume = (epoch, consumed) if consumed else None

    def __len__(self) -> int:
        return self.num_samples


class LengthBucketSampler(_ShardedSampler):
    """Indices whose consecutive runs of ``batch_size`` have similar lengths (less padding).

    Indices are shuffled, cut into windows of ``batch_size * window`` examples, sorted by
    length inside each window and cut into batches; the batches are shuffled (a short batch, if
    any, goes last) and flattened. ``batch_size`` is the global batch (per-device batch x W):
    a ``DataLoader`` with the per-device batch size then yields each device's share.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        window: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_offset: int = 0,
    ) -> None:
        super().__init__(len(lengths), seed, num_replicas, rank, epoch_offset)
        self.lengths, self.batch_size, self.window = lengths, batch_size, window

    def batches(self) -> list[list[int]]:
        """This epoch's global batches of ``batch_size`` indices (only the last may be short)."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return full + short

    def order(self) -> list[int]:
        return [i for batch in self.batches() for i in batch]


class EpochShuffleSampler(_ShardedSampler):
    """A permutation seeded by (seed, epoch): a resumed run sees the same order as an
    uninterrupted one (Lightning calls ``set_epoch``); under DDP, this rank's share of it."""

    def __init__(
        self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, epoch_offset: int = 0
    ):
        super().__init__(size, seed, num_replicas, rank, epoch_offset)

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` over one of our samplers whose position inside an epoch survives
    a checkpoint.

    Lightning stores ``state_dict()`` of every train loader that has one in the checkpoint
    (``loops.fit_loop.combined_loader``) and, when a fit resumes inside an epoch, hands it back
    through ``load_state_dict`` before the epoch's loader iterator starts. The state is the
    sampler's position: the fit epoch and how many indices of this rank's share the batches
    already yielded cover, counted here (exact with worker processes too, which fetch ahead).
    The resumed pass then yields exactly the batches the interrupted one had not.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pass: tuple[int, int] | None = None  # (fit epoch, start) of the current pass
        self._yielded = 0  # batches of the current pass handed to training

    def __iter__(self) -> Iterator:
        # A generator: the underlying iterator (and any workers) starts at the first batch, when
        # Lightning has set the sampler's epoch.
        self._pass, self._yielded = None, 0
        return self._count(super().__iter__)

    def _count(self, make_iterator) -> Iterator:
        for batch in make_iterator():
            if self._pass is None:  # the sampler has begun this pass: where?
                sampler = self.sampler
                self._pass = (getattr(sampler, "fit_epoch", 0), getattr(sampler, "start", 0))
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not isinstance(sampler, _ShardedSampler):  # Lightning swapped it (overfit_batches)
            return {}
        consumed = 0  # nothing of the sampler's epoch yet, unless this pass is of that epoch
        if self._pass is not None and self._pass[0] == sampler.fit_epoch:
            consumed = self._pass[1] + self._yielded * self.batch_size
        return sampler.state_dict(consumed=consumed)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._pass, self._yielded = None, 0
        if state and isinstance(self.sampler, _ShardedSampler):
            self.sampler.load_state_dict(state)


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs of several values.

    The module trains on the values in :attr:`active_values` (one per sequential stage, all of
    them for the joint schedule): ``train_dataloader`` returns a dict value -> loader, which
    Lightning combines so that each batch holds pairs of every active value. The LightningModule
    sets :attr:`active_values` and :attr:`epoch_offset` (the fit's epoch at which the stage
    began, so that each stage's shuffles are seeded by its own epoch count) at every stage.

    Args:
        splits: Value name -> its train/val/test pairs.
        tokenizer: The base model's tokenizer.
        batch_size: Pairs per value per training batch.
        eval_batch_size: Pairs per batch for validation and scoring.
        max_length: Longest prompt + response in tokens.
        max_prompt_length: Longest prompt in tokens (keeps the end).
        chat_template: Format prompts with the tokenizer's chat template.
        bucket_by_length: Batches of similar-length pairs (see :class:`LengthBucketSampler`,
            like Transformers' ``group_by_length``) to cut padding; ``False``: a plain shuffle.
        seed: Shuffling seed.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        splits: Mapping[str, Splits],
        tokenizer,
        batch_size: int = 2,
        eval_batch_size: int = 8,
        max_length: int = 512,
        max_prompt_length: int = 128,
        chat_template: bool = False,
        bucket_by_length: bool = True,
        seed: int = 60,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.splits = dict(splits)
        self.tokenizer = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.chat_template, self.bucket_by_length = chat_template, bucket_by_length
        self.seed, self.num_workers = seed, num_workers
        self.active_values: list[str] = list(self.splits)
        self.epoch_offset = 0
        self._tokenized: dict[tuple[str, str], list[Tokenized]] = {}

    @property
    def values(self) -> list[str]:
        return list(self.splits)

    def tokenized(self, value: str, split: str) -> list[Tokenized]:
        """The value's split, tokenised on first use and kept."""
        if value not in self.splits:
            raise KeyError(f"no data for value {value!r}; values: {self.values}")
        key = (value, split)
        if key not in self._tokenized:
            pairs = getattr(self.splits[value], split)
            self._tokenized[key] = [
                tokenize_pair(
                    p,
                    i,
                    self.tokenizer,
                    self.max_length,
                    self.max_prompt_length,
                    self.chat_template,
                )
                for i, p in enumerate(pairs)
            ]
        return self._tokenized[key]

    def loader(self, value: str, split: str, shuffle: bool = False) -> DataLoader:
        """A DataLoader over one value's split ([chosen; rejected] batches)."""
        data = self.tokenized(value, split)
        collate = functools.partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id)
        # Its own generator: iterating a loader draws a seed for its workers, which would
        # otherwise come from the global RNG and shift the training steps' random numbers
        # (dropout) by the number of loaders started, something a resumed run cannot replay.
        generator = torch.Generator().manual_seed(self.seed)
        kw = dict(collate_fn=collate, num_workers=self.num_workers, generator=generator)
        world, rank = self.replicas()
        if split == "train" and shuffle and self.bucket_by_length:
            # A pair's tokens: its packed row's length (logps ``share_prompt``) and, closely,
            # its two rows' padded width on the plain path.
            lengths = [len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in data]
            # Buckets of the global batch; each of the W devices takes every W-th index.
            sampler = LengthBucketSampler(
                lengths,
                self.batch_size * world,
                self.seed,
                num_replicas=world,
                rank=rank,
                epoch_offset=self.epoch_offset,
            )
            return ResumableDataLoader(data, batch_size=self.batch_size, sampler=sampler, **kw)
        size = self.batch_size if split == "train" else self.eval_batch_size
        if shuffle:
            sampler = EpochShuffleSampler(len(data), self.seed, world, rank, self.epoch_offset)
            return ResumableDataLoader(data, batch_size=size, sampler=sampler, **kw)
        return DataLoader(data, batch_size=size, **kw)

    def replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the attached Trainer; (1, 0) without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {v: self.loader(v, "train", shuffle=True) for v in self.active_values}

    def val_dataloader(self) -> list[DataLoader]:
        return [self.loader(v, "val") for v in self.active_values if self.splits[v].val]

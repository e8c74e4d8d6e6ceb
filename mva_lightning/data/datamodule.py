"""The preference data module: per-value splits, tokenised once, batched as [chosen; rejected]."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from mva_lightning.data.collate import Tokenized, collate_pairs, tokenize_pair
from mva_lightning.data.sources import Splits

SPLITS = ("train", "val", "test")


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a shuffled order of batches.

    Indices are shuffled, cut into windows of ``batch_size * window`` examples, sorted by
    length inside each window and cut into batches; the batches are then shuffled.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, window: int = 50):
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
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
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class EpochShuffleSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch): a resumed run sees the same order as an
    uninterrupted one (Lightning calls ``set_epoch``)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs of several values.

    The module trains on the values in :attr:`active_values` (one per sequential stage, all of
    them for the joint schedule): ``train_dataloader`` returns a dict value -> loader, which
    Lightning combines so that each batch holds pairs of every active value.

    Args:
        splits: Value name -> its train/val/test pairs.
        tokenizer: The base model's tokenizer.
        batch_size: Pairs per value per training batch.
        eval_batch_size: Pairs per batch for validation and scoring.
        max_length: Longest prompt + response in tokens.
        max_prompt_length: Longest prompt in tokens (keeps the end).
        chat_template: Format prompts with the tokenizer's chat template.
        bucket_by_length: Group training batches by length to cut padding.
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
        bucket_by_length: bool = False,
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
        kw = dict(collate_fn=collate, num_workers=self.num_workers)
        if split == "train" and shuffle and self.bucket_by_length:
            lengths = [
                len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in data
            ]
            sampler = LengthBucketSampler(lengths, self.batch_size, seed=self.seed)
            return DataLoader(data, batch_sampler=sampler, **kw)
        size = self.batch_size if split == "train" else self.eval_batch_size
        sampler = EpochShuffleSampler(len(data), self.seed) if shuffle else None
        return DataLoader(data, batch_size=size, sampler=sampler, **kw)

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {v: self.loader(v, "train", shuffle=True) for v in self.active_values}

    def val_dataloader(self) -> list[DataLoader]:
        return [self.loader(v, "val") for v in self.active_values if self.splits[v].val]

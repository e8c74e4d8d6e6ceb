"""Shared test helpers: toy preference files, config composition, the real preference data."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real HH-RLHF / PKU-SafeRLHF rows: $MVA_TEST_DATA, else `shared/data` beside the checkout
# (where CI places them).
TEST_DATA = Path(os.environ.get("MVA_TEST_DATA") or REPO.parent / "shared" / "data")
NO_TEST_DATA = (
    "real preference data not available "
    "(set MVA_TEST_DATA to a folder holding hh-rlhf/ and pku-saferlhf/)"
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: one thread is faster than two fighting over a shared machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def real_data_file(*parts: str) -> Path:
    """A file of the real preference data (``$MVA_TEST_DATA/<parts>``), or skip the test."""
    path = TEST_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{NO_TEST_DATA}: {'/'.join(parts)} is absent")
    return path


def write_hh_file(path: Path, n: int, good: str, bad: str) -> Path:
    """An HH-format JSONL.gz file of n toy pairs: chosen ends with `good`, rejected with `bad`."""
    with gzip.open(path, "wt") as fh:
        for i in range(n):
            prompt = f"\n\nHuman: Tell me about item {i}.\n\nAssistant:"
            fh.write(json.dumps({"chosen": f"{prompt} {good} {i}.", "rejected": f"{prompt} {bad}"}))
            fh.write("\n")
    return path


@pytest.fixture
def toy_data(tmp_path) -> dict[str, Path]:
    """Two toy values in HH format: helpful prefers long answers, harmless prefers refusals."""
    return {
        "helpful": write_hh_file(tmp_path / "helpful.jsonl.gz", 24, "Here is a full answer", "No."),
        "harmless": write_hh_file(tmp_path / "harmless.jsonl.gz", 24, "I cannot help.", "Sure!"),
    }


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml with overrides, as `python -m mva_lightning` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "mva_lightning" / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def toy_overrides(toy_data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides for a fast run of the tiny model on the toy data, CSV logging only."""
    return [
        "model=tiny",
        "value=[helpful,harmless]",
        "data=paper",
        "extrapolation=grid",
        "optimizer.lr=1e-5",
        f"value.helpful.source.files=[{toy_data['helpful']}]",
        f"value.harmless.source.files=[{toy_data['harmless']}]",
        f"paths.output_dir={out}",
        "logger=csv",
        "data.loader.max_length=64",
        "data.loader.max_prompt_length=40",
        "data.loader.batch_size=4",
        "data.split.test=0.1",
        "data.split.val=0.1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


class TableScorer:
    """A fake scorer: score = table[response]."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def __call__(self, prompts, responses):
        return [self.table[r] for r in responses]


# A tiny policy with random value vectors and held-out pairs: the objectives' and sweep's tests.
VALUES = ["helpful", "harmless"]


def make_policy(values=VALUES, seed=0):
    """A tiny policy whose value vectors are random (non-zero B): each one moves the model."""
    import copy

    from mva_lightning.model import lora
    from mva_lightning.model.backbones import tiny_llama

    backbone = tiny_llama(seed=1)
    policy = lora.add_value_vectors(copy.deepcopy(backbone.model), values, r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(policy):
            for v in values:
                w = layer.lora_B[v].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return policy.eval(), backbone


def _pairs(value, n, offset):
    from mva_lightning.data.sources import PreferencePair

    good, bad = ("Here is how.", "No.") if value == "helpful" else ("I cannot.", "Sure!")
    return [
        PreferencePair(f"\n\nHuman: item {offset + i}?\n\nAssistant:", f" {good} {i}", f" {bad}")
        for i in range(n)
    ]


def make_datamodule(tokenizer, values=VALUES, n_val=6, n_test=4):
    """Held-out pairs per value (val prompts shared across values, to test deduplication)."""
    from mva_lightning.data.datamodule import PreferenceDataModule
    from mva_lightning.data.sources import Splits

    splits = {
        v: Splits(train=_pairs(v, 4, 100), val=_pairs(v, n_val, 0), test=_pairs(v, n_test, 50))
        for v in values
    }
    return PreferenceDataModule(
        splits, tokenizer, eval_batch_size=4, max_length=48, max_prompt_length=24
    )


# ----------------------------------------------------------------- the module on a tiny model
@pytest.fixture(scope="module")
def base():
    """A random-init 2-layer Llama with a byte tokenizer (shared, never trained: deep-copy it)."""
    from mva_lightning.model.backbones import tiny_llama

    return tiny_llama(seed=3)


def toy_pairs(good: str, bad: str, n: int = 16):
    """n toy pairs whose chosen response is ``good`` (numbered) and rejected one ``bad``."""
    from mva_lightning.data.sources import PreferencePair

    return [
        PreferencePair(f"\n\nHuman: item {i}?\n\nAssistant:", f"{good} {i}", bad) for i in range(n)
    ]


def tiny_module(base, r: int = 4, max_length: int = 64, max_prompt_length: int = 32, lr=1e-2, **kw):
    """(MVAModule, PreferenceDataModule): helpful (long answers) and harmless (refusals) value
    vectors of rank ``r`` on a copy of ``base``; ``kw`` goes to :class:`MVAModule`."""
    import copy

    from mva_lightning.data.datamodule import PreferenceDataModule
    from mva_lightning.data.sources import split_pairs
    from mva_lightning.model import lora
    from mva_lightning.training.module import MVAModule

    values = ["helpful", "harmless"]
    policy = lora.add_value_vectors(copy.deepcopy(base.model), values, r=r, lora_alpha=8)
    splits = {
        "helpful": split_pairs(toy_pairs("a long helpful answer", "no"), 0.1, 0.1, 0),
        "harmless": split_pairs(toy_pairs("I refuse", "sure thing"), 0.1, 0.1, 0),
    }
    dm = PreferenceDataModule(
        splits,
        base.tokenizer,
        batch_size=4,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    module = MVAModule(policy, values, optimizer=lambda p: torch.optim.AdamW(p, lr=lr), **kw)
    return module, dm


def quiet_trainer(**kw):
    """A CPU ``lightning.Trainer`` without logger, checkpoints, bars or summary; ``kw`` wins."""
    import lightning as L

    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_epochs": 1,
    }
    return L.Trainer(**{**defaults, **kw})

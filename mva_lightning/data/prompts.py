"""Prompt files: one JSON object per line with a ``prompt`` and, optionally, its labels.

The package ships one (``assets/prompts.jsonl``, addressed as :data:`PACKAGE_PROMPTS`): the
project's own requests and prompts drawn from HH-RLHF (provenance in ``assets/README.md``).
Keys of a row:

- ``prompt`` (required): the user's request, one turn of plain text;
- ``category``: ``benign`` or ``sensitive`` (a request a careful assistant declines);
- ``split``: ``train`` (sampled into training pairs), ``val`` (selects the front) or ``test``
  (reports it); a row without one is ``train``.

The embedded default samples training pairs from the ``train`` rows and scores its sweep on the
``val`` and ``test`` rows, so the held-out prompts are disjoint from training by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from mva_lightning.data.sources import DataError, read_jsonl

PACKAGE_PROMPTS = "pkg://mva_lightning/assets/prompts.jsonl"
CATEGORIES = ("benign", "sensitive")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompt file; ``prompt`` is the HH transcript the data sources speak."""

    prompt: str
    category: str | None
    split: str


def transcript(question: str) -> str:
    """The HH transcript format every source speaks: ``\\n\\nHuman: q\\n\\nAssistant:``."""
    return f"\n\nHuman: {question.strip()}\n\nAssistant:"


def resolve(path: str | os.PathLike | None) -> str:
    """A readable path for ``path``: ``pkg://PACKAGE/FILE`` names a file inside an installed
    package (as Hydra's search path does); None is the package's own prompts."""
    path = str(path) if path is not None else PACKAGE_PROMPTS
    if path.startswith("pkg://"):
        package, _, name = path[len("pkg://") :].partition("/")
        return str(resources.files(package) / name)
    return path


def read_prompts(
    path: str | os.PathLike | None = None,
    split: str | None = None,
    category: str | None = None,
) -> list[PromptRow]:
    """The rows of a prompt file, checked, optionally only one split and one category.

    Args:
        path: The file (``pkg://`` allowed); None: :data:`PACKAGE_PROMPTS`.
        split: Keep only rows of this split (rows without a split are ``train``).
        category: Keep only rows of this category.

    Raises:
        DataError: Naming the file and line of a row without a non-empty ``prompt``, or with an
            unknown ``split`` or ``category``; or when no row is left.
    """
    for name, got, allowed in (("split", split, SPLITS), ("category", category, CATEGORIES)):
        if got is not None and got not in allowed:
            raise DataError(f"prompt {name} {got!r}: expected one of {list(allowed)}")
    file = resolve(path)
    rows = []
    for line, row in read_jsonl(file):
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{file}, line {line}: expected a non-empty string under 'prompt'")
        row_split, row_category = row.get("split", "train"), row.get("category")
        if row_split not in SPLITS:
            raise DataError(f"{file}, line {line}: split {row_split!r}, expected one of {SPLITS}")
        if row_category is not None and row_category not in CATEGORIES:
            raise DataError(
                f"{file}, line {line}: category {row_category!r}, expected one of {CATEGORIES}"
            )
        if split in (None, row_split) and category in (None, row_category):
            rows.append(PromptRow(transcript(text), row_category, row_split))
    if not rows:
        raise DataError(f"{file}: no prompts (split={split!r}, category={category!r})")
    return rows


def load_prompts(
    path: str | os.PathLike | None = None,
    category: str | None = None,
    split: str | None = None,
) -> list[str]:
    """The transcripts of :func:`read_prompts`, in file order."""
    return [r.prompt for r in read_prompts(path, split, category)]


def categories(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Transcript -> category for every labelled row of a prompt file."""
    return {r.prompt: r.category for r in read_prompts(path) if r.category is not None}

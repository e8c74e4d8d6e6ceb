"""Preference-pair sources: HH-RLHF, PKU-SafeRLHF, generic JSONL files and hub datasets.

Every source returns a list of :class:`PreferencePair` in one transcript format, the one
HH-RLHF uses: the prompt is a dialogue ending in ``"\\n\\nAssistant:"`` and ``chosen`` /
``rejected`` are the final assistant turns (docs/method.md §6). Rows whose responses are
empty or identical are dropped and counted (:func:`clean_pairs`); :func:`split_pairs` makes the
paper's seeded 5 % test / 1 % validation split.

Local files (``.jsonl`` or ``.jsonl.gz``; glob patterns allowed) work offline; without them a
source calls ``datasets.load_dataset``. Every bad input raises :class:`DataError`, whose message
names the file (or hub dataset), the 1-based line (or row) and the key at fault. With
``on_bad_row="skip"`` a source leaves out bad rows (:class:`RowError`: not JSON, a missing key,
no shared prompt, ...) instead, and logs one warning per file with their count, reasons and first
line numbers; a file that cannot be read at all is still an error.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
PKU_LABELS = {"better": "better_response_id", "safer": "safer_response_id"}

ON_BAD_ROW = ("error", "skip")
SHOWN_LINES = 5  # line numbers listed per reason in the skipped-rows warning

Files = Sequence[str | os.PathLike] | str | os.PathLike


@dataclass(frozen=True)
class PreferencePair:
    """One preference: a prompt and two responses, ``chosen`` preferred over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str


class DataError(ValueError):
    """Bad preference data: the message names the file, line and key, and what was expected."""


class RowError(DataError):
    """One bad row (line), which ``on_bad_row="skip"`` leaves out.

    Attributes:
        reason: What is wrong, in a few words, for the skipped-rows count (``"not valid JSON"``,
            ``"missing key 'rejected'"``); the message says it in full, with file and line.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# (file or dataset name, 1-based line/row, the object or the RowError of a line that is not one)
Row = tuple[str, int, dict[str, Any] | RowError]


@dataclass
class Splits:
    """Disjoint train / validation / test pairs."""

    train: list[PreferencePair]
    val: list[PreferencePair]
    test: list[PreferencePair]


# ----------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read a ``.jsonl`` or ``.jsonl.gz`` file one JSON object per line.

    The file is checked when called (not on first iteration), so a missing file fails at once.

    Args:
        path: The file; a ``.gz`` suffix means gzip.

    Returns:
        An iterator of ``(line_number, object)``, 1-based line numbers; blank lines are skipped.

    Raises:
        DataError: The file is missing or unreadable, a line is not valid UTF-8 JSON, or a line
            holds something other than a JSON object (a :class:`RowError`).
    """
    return _read_lines(_check_file(path))


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, obj in _scan_lines(path):
        if isinstance(obj, RowError):
            raise obj
        yield lineno, obj


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: {what}; expected a .jsonl or .jsonl.gz file")
    return path


def _scan_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """``(line_number, object)`` per non-blank line, or ``(line_number, RowError)`` for a line
    that is not a JSON object (the scan goes on); a file that cannot be read raises."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    # utf-8-sig: a file saved with a byte-order mark reads like any other
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                except UnicodeDecodeError as e:
                    err = RowError(f"{path}, line {lineno}: not valid UTF-8 ({e})", "not UTF-8")
                    err.__cause__ = e
                    yield lineno, err
                    continue
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    err = RowError(
                        f"{path}, line {lineno}: not valid JSON ({e.msg}); "
                        "expected one JSON object per line",
                        "not valid JSON",
                    )
                    err.__cause__ = e
                    yield lineno, err
                    continue
                if not isinstance(obj, dict):
                    what = type(obj).__name__
                    err = RowError(
                        f"{path}, line {lineno}: expected a JSON object, got {what}",
                        "not a JSON object",
                    )
                    yield lineno, err
                    continue
                yield lineno, obj
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}, line {lineno + 1}: cannot read the file ({e})") from e


def _expand(files: Files) -> list[str]:
    """Expand glob patterns (sorted); literal paths pass through for :func:`read_jsonl`."""
    if isinstance(files, str | os.PathLike):
        files = [files]
    out: list[str] = []
    for entry in files:
        entry = os.fspath(entry)
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise DataError(f"{entry}: the pattern matches no file")
            out.extend(matches)
        else:
            out.append(entry)
    if not out:
        raise DataError("no files given; expected at least one .jsonl or .jsonl.gz path")
    return out


def _file_rows(files: Files) -> Iterator[Row]:
    # rows and RowErrors of bad lines; a file that cannot be read raises in every mode
    for name in _expand(files):
        for lineno, obj in _scan_lines(_check_file(name)):
            yield name, lineno, obj


def _hub_rows(name: str, split: str, data_dir: str | None = None) -> Iterator[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as e:  # network, auth, missing config: all mean "use local files"
        where = f"{name!r} (data_dir={data_dir!r}, split={split!r})"
        raise DataError(
            f"could not load {where} from the Hugging Face hub: the hub is unreachable or the "
            f"dataset is not cached ({type(e).__name__}: {e}); pass files=[...] to read local "
            ".jsonl/.jsonl.gz files instead"
        ) from e
    label = f"{name}[{split}]" if data_dir is None else f"{name}/{data_dir}[{split}]"
    for i, row in enumerate(ds, start=1):
        yield label, i, dict(row)


def _text(obj: dict[str, Any], key: str, name: str, lineno: int) -> str:
    if key not in obj:
        raise RowError(
            f"{name}, line {lineno}: missing key {key!r}; the row has keys {sorted(obj)}",
            f"missing key {key!r}",
        )
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(
            f"{name}, line {lineno}: key {key!r} should hold a string, got {type(value).__name__}",
            f"key {key!r} not a string",
        )
    return value


def _check_on_bad_row(on_bad_row: str, source: str) -> bool:
    """Whether to skip bad rows; an unknown ``on_bad_row`` is an error."""
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(
            f"{source}: on_bad_row should be one of {', '.join(map(repr, ON_BAD_ROW))}, "
            f"got {on_bad_row!r}"
        )
    return on_bad_row == "skip"


def _collect(
    rows: Iterable[Row],
    parse: Callable[[dict[str, Any], str, int], PreferencePair],
    source: str,
    max_rows: int | None,
    on_bad_row: str = "error",
) -> list[PreferencePair]:
    skip = _check_on_bad_row(on_bad_row, source)
    if max_rows is not None:
        if max_rows < 1:
            raise DataError(f"{source}: max_rows should be a positive integer, got {max_rows}")
        rows = islice(rows, max_rows)
    pairs: list[PreferencePair] = []
    read: Counter[str] = Counter()  # rows read per file
    skipped: dict[str, dict[str, list[int]]] = {}  # file -> reason -> line numbers
    for name, lineno, obj in rows:
        read[name] += 1
        try:
            if isinstance(obj, RowError):
                raise obj
            pairs.append(parse(obj, name, lineno))
        except RowError as err:
            if not skip:
                raise
            skipped.setdefault(name, {}).setdefault(err.reason, []).append(lineno)
    for name, reasons in skipped.items():
        log.warning("%s", skipped_summary(name, read[name], reasons))
    if skipped and not pairs:
        n_read = sum(read.values())
        n_bad = sum(len(lines) for reasons in skipped.values() for lines in reasons.values())
        raise DataError(
            f"{source}: no preference pairs: all {n_bad} of {n_read} rows read were bad and "
            f"skipped (on_bad_row='skip'; see the warnings above for why)"
        )
    return clean_pairs(pairs, source)


def skipped_summary(name: str, total: int, reasons: dict[str, list[int]]) -> str:
    """``"f.jsonl: skipped 3 of 120 rows (2 x missing key 'rejected', lines 4, 9; 1 x ...)"``.

    Args:
        name: The file (or hub dataset).
        total: Rows read from it.
        reasons: Line numbers of the skipped rows, by reason; the first
            :data:`SHOWN_LINES` of each are listed.
    """
    parts = []
    for reason, lines in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[1][0])):
        shown = ", ".join(map(str, lines[:SHOWN_LINES])) + (
            ", ..." if len(lines) > SHOWN_LINES else ""
        )
        parts.append(f"{len(lines)} x {reason}, line{'s' if len(lines) > 1 else ''} {shown}")
    n = sum(len(lines) for lines in reasons.values())
    return f"{name}: skipped {n} of {total} rows ({'; '.join(parts)})"


# ----------------------------------------------------------------------------- HH-RLHF


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into the shared prompt and the two final assistant turns.

    The prompt runs up to and including the last ``"\\n\\nAssistant:"`` of ``chosen``. Where
    ``rejected`` does not share that prefix (a few rows hold an extra ``"\\n\\nAssistant:"``
    inside the final turn), the prompt is the longest common prefix that ends at an
    ``"\\n\\nAssistant:"``. The responses are the text after the prompt, whitespace-stripped.

    Args:
        chosen: The preferred transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).
        rejected: The other transcript.

    Returns:
        ``(prompt, chosen_response, rejected_response)``.

    Raises:
        DataError: The transcripts share no prefix that ends at ``"\\n\\nAssistant:"``.
    """
    end = chosen.rfind(ASSISTANT)
    if end >= 0 and rejected.startswith(chosen[: end + len(ASSISTANT)]):
        cut = end + len(ASSISTANT)
    else:
        common = os.path.commonprefix([chosen, rejected])
        end = common.rfind(ASSISTANT)
        if end < 0:
            raise DataError(
                "chosen and rejected share no prefix ending at '\\n\\nAssistant:'; expected "
                "two HH-RLHF transcripts that differ only in the final assistant turn"
            )
        cut = end + len(ASSISTANT)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def _hh_row(obj: dict[str, Any], name: str, lineno: int) -> PreferencePair:
    chosen, rejected = _text(obj, "chosen", name, lineno), _text(obj, "rejected", name, lineno)
    try:
        return PreferencePair(*split_transcript(chosen, rejected))
    except DataError as e:
        raise RowError(
            f"{name}, line {lineno}: keys 'chosen'/'rejected': {e}",
            "no shared prompt ending at 'Assistant:'",
        ) from None


def hh_rlhf(
    files: Files | None = None,
    hub: str = "Anthropic/hh-rlhf",
    data_dir: str = "helpful-base",
    split: str = "train",
    max_rows: int | None = None,
    on_bad_row: str = "error",
) -> list[PreferencePair]:
    """Load Anthropic HH-RLHF pairs (``chosen`` / ``rejected`` full transcripts).

    Args:
        files: Local ``.jsonl``/``.jsonl.gz`` files or glob patterns with keys ``chosen`` and
            ``rejected``; ``None`` loads ``hub`` with ``datasets.load_dataset``.
        hub: Hub dataset name, used only when ``files`` is ``None``.
        data_dir: Hub subset: ``helpful-base`` (helpfulness), ``harmless-base``
            (harmlessness), ``helpful-online``, ``helpful-rejection-sampled``.
        split: Hub split.
        max_rows: Keep only the first ``max_rows`` rows read, counted before cleaning.
        on_bad_row: ``"error"``: the first bad row (not a JSON object, a missing or
            non-string key, transcripts without a shared prompt) raises :class:`DataError`;
            ``"skip"``: bad rows are left out and one warning per file counts them by reason,
            with their first line numbers.

    Returns:
        Cleaned pairs (see :func:`split_transcript` and :func:`clean_pairs`).

    Raises:
        DataError: A file or key is missing or malformed (a bad row only with
            ``on_bad_row="error"``), the hub is unreachable, ``on_bad_row`` is unknown, or no
            pair survives skipping and cleaning.
    """
    if files is not None:
        return _collect(_file_rows(files), _hh_row, "hh-rlhf", max_rows, on_bad_row)
    _check_on_bad_row(on_bad_row, "hh-rlhf")  # before any download
    rows = _hub_rows(hub, split, data_dir)
    return _collect(rows, _hh_row, f"hh-rlhf/{data_dir}", max_rows, on_bad_row)


# ----------------------------------------------------------------------------- PKU-SafeRLHF


def _pku_parser(label: str) -> Callable[[dict[str, Any], str, int], PreferencePair]:
    if label not in PKU_LABELS:
        raise DataError(f"pku_saferlhf: label should be one of {sorted(PKU_LABELS)}, got {label!r}")
    key = PKU_LABELS[label]

    def parse(obj: dict[str, Any], name: str, lineno: int) -> PreferencePair:
        prompt = _text(obj, "prompt", name, lineno)
        responses = [_text(obj, f"response_{i}", name, lineno) for i in (0, 1)]
        if key not in obj:
            raise RowError(
                f"{name}, line {lineno}: missing key {key!r}; expected 0 or 1",
                f"missing key {key!r}",
            )
        best = obj[key]
        if isinstance(best, bool) or not isinstance(best, int) or best not in (0, 1):
            raise RowError(
                f"{name}, line {lineno}: key {key!r} should be 0 or 1, got {best!r}",
                f"key {key!r} not 0 or 1",
            )
        return PreferencePair(
            prompt=f"{HUMAN} {prompt.strip()}{ASSISTANT}",
            chosen=responses[best].strip(),
            rejected=responses[1 - best].strip(),
        )

    return parse


def pku_saferlhf(
    files: Files | None = None,
    hub: str = "PKU-Alignment/PKU-SafeRLHF",
    split: str = "train",
    label: str = "better",
    max_rows: int | None = None,
    data_dir: str | None = None,
    on_bad_row: str = "error",
) -> list[PreferencePair]:
    """Load PKU-SafeRLHF pairs, helpful or harmless by ``label``.

    PKU prompts are bare questions; they become ``"\\n\\nHuman: {prompt}\\n\\nAssistant:"`` so
    every source speaks the HH-RLHF transcript format. Prompt and responses are
    whitespace-stripped, as HH-RLHF final turns are.

    Args:
        files: Local ``.jsonl``/``.jsonl.gz`` files or glob patterns with keys ``prompt``,
            ``response_0``, ``response_1`` and the label key; ``None`` loads ``hub``.
        hub: Hub dataset name (also ``PKU-Alignment/PKU-SafeRLHF-10K``).
        split: Hub split.
        label: ``"better"`` picks ``chosen = response_{better_response_id}`` (helpfulness),
            ``"safer"`` picks ``chosen = response_{safer_response_id}`` (harmlessness);
            ``rejected`` is the other response.
        max_rows: Keep only the first ``max_rows`` rows read, counted before cleaning.
        data_dir: Hub subfolder (e.g. ``data/Alpaca3-8B``); ``None`` loads every one.
        on_bad_row: ``"error"``: the first bad row (not a JSON object, a missing or
            non-string key, a label other than 0 or 1) raises :class:`DataError`; ``"skip"``:
            bad rows are left out and one warning per file counts them by reason, with their
            first line numbers.

    Returns:
        Cleaned pairs (see :func:`clean_pairs`).

    Raises:
        DataError: Unknown ``label`` or ``on_bad_row``, a missing or malformed file or key (a
            bad row only with ``on_bad_row="error"``), an unreachable hub, or no pair left
            after skipping and cleaning.
    """
    parse = _pku_parser(label)  # fails fast on a bad label, before any download
    source = f"pku-saferlhf/{label}"
    _check_on_bad_row(on_bad_row, source)
    rows = _file_rows(files) if files is not None else _hub_rows(hub, split, data_dir)
    return _collect(rows, parse, source, max_rows, on_bad_row)


# ----------------------------------------------------------------------------- generic


def _keyed_parser(
    prompt_key: str, chosen_key: str, rejected_key: str
) -> Callable[[dict[str, Any], str, int], PreferencePair]:
    def parse(obj: dict[str, Any], name: str, lineno: int) -> PreferencePair:
        return PreferencePair(
            prompt=_text(obj, prompt_key, name, lineno),
            chosen=_text(obj, chosen_key, name, lineno),
            rejected=_text(obj, rejected_key, name, lineno),
        )

    return parse


def jsonl_pairs(
    files: Files,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    max_rows: int | None = None,
    on_bad_row: str = "error",
) -> list[PreferencePair]:
    """Load pairs from local JSONL files whose rows hold prompt, chosen and rejected strings.

    Values are kept exactly as stored (no transcript formatting, no stripping).

    Args:
        files: ``.jsonl``/``.jsonl.gz`` paths or glob patterns.
        prompt_key: Key of the prompt.
        chosen_key: Key of the preferred response.
        rejected_key: Key of the other response.
        max_rows: Keep only the first ``max_rows`` rows read, counted before cleaning.
        on_bad_row: ``"error"``: the first bad row (not a JSON object, a missing or
            non-string key) raises :class:`DataError`; ``"skip"``: bad rows are left
            out and one warning per file counts them by reason, with their first line numbers.

    Returns:
        Cleaned pairs (see :func:`clean_pairs`).

    Raises:
        DataError: A missing or malformed file, a missing key or a non-string value (only with
            ``on_bad_row="error"``), an unknown ``on_bad_row``, or no pair left after skipping
            and cleaning.
    """
    parse = _keyed_parser(prompt_key, chosen_key, rejected_key)
    return _collect(_file_rows(files), parse, "jsonl", max_rows, on_bad_row)


def hub_pairs(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    max_rows: int | None = None,
    on_bad_row: str = "error",
) -> list[PreferencePair]:
    """Load pairs from a hub dataset with prompt, chosen and rejected string columns.

    Args:
        name: Hub dataset name, passed to ``datasets.load_dataset``.
        split: Split to load.
        data_dir: Optional subfolder of the dataset.
        prompt_key: Column of the prompt.
        chosen_key: Column of the preferred response.
        rejected_key: Column of the other response.
        max_rows: Keep only the first ``max_rows`` rows, counted before cleaning.
        on_bad_row: ``"error"``: the first row with a missing or non-string column raises
            :class:`DataError`; ``"skip"``: such rows are left out and counted in one warning.

    Returns:
        Cleaned pairs (see :func:`clean_pairs`); values are kept exactly as stored.

    Raises:
        DataError: The hub is unreachable, a column is missing or not a string (only with
            ``on_bad_row="error"``), ``on_bad_row`` is unknown, or no pair is left after
            skipping and cleaning.
    """
    parse = _keyed_parser(prompt_key, chosen_key, rejected_key)
    _check_on_bad_row(on_bad_row, name)  # before any download
    return _collect(_hub_rows(name, split, data_dir), parse, name, max_rows, on_bad_row)


# ----------------------------------------------------------------------------- clean / split


def clean_pairs(pairs: Iterable[PreferencePair], source: str) -> list[PreferencePair]:
    """Drop pairs with an empty prompt or response, or with identical responses, and log counts.

    Emptiness is judged after ``strip()``; a pair that is both empty and identical counts as
    empty.

    Args:
        pairs: Pairs to clean.
        source: Name used in the log line and in errors.

    Returns:
        The kept pairs, in order.

    Raises:
        DataError: No pair is left.
    """
    kept: list[PreferencePair] = []
    empty = identical = 0
    for p in pairs:
        if not (p.prompt.strip() and p.chosen.strip() and p.rejected.strip()):
            empty += 1
        elif p.chosen.strip() == p.rejected.strip():
            identical += 1
        else:
            kept.append(p)
    total = len(kept) + empty + identical
    log.info(
        "%s: kept %d of %d pairs; dropped %d with an empty prompt or response, "
        "%d with identical responses",
        source,
        len(kept),
        total,
        empty,
        identical,
    )
    if not kept:
        raise DataError(
            f"{source}: no preference pairs left out of {total} "
            f"({empty} empty, {identical} identical); expected at least one usable pair"
        )
    return kept


def split_pairs(
    pairs: Sequence[PreferencePair],
    test: float = 0.05,
    val: float = 0.01,
    seed: int = 60,
    by_prompt: bool = False,
) -> Splits:
    """Split pairs into train / validation / test by a seeded permutation.

    Sizes are ``round(n * fraction)``, but at least 1 when ``n >= 3`` and the fraction is
    positive; train gets the rest. The same pairs and seed always give the same split.

    With ``by_prompt``, each pair's split is decided by a seeded hash of its prompt instead:
    fractions hold only approximately, but a prompt lands in the same split for every value
    (values built on one prompt set, like the embedded default, then share held-out prompts).

    Args:
        pairs: Pairs to split.
        test: Test fraction, in ``[0, 1)``.
        val: Validation fraction, in ``[0, 1)``.
        seed: Seed of the ``random.Random`` permutation (or of the prompt hash).
        by_prompt: Assign splits by prompt hash (consistent across values).

    Returns:
        The three disjoint splits, each in permuted order.

    Raises:
        DataError: A fraction is outside ``[0, 1)``, ``test + val >= 1``, there are no pairs,
            or the fractions leave no training pair.
    """
    for key, frac in (("test", test), ("val", val)):
        if not 0 <= frac < 1:
            raise DataError(f"split_pairs: {key} should be a fraction in [0, 1), got {frac}")
    if test + val >= 1:
        raise DataError(f"split_pairs: test + val should be below 1, got {test} + {val}")
    n = len(pairs)
    if n == 0:
        raise DataError("split_pairs: no pairs to split")

    def size(frac: float) -> int:
        k = round(n * frac)
        return max(k, 1) if n >= 3 and frac > 0 else k

    if by_prompt:
        return _split_by_prompt(pairs, test, val, seed)
    n_test, n_val = size(test), size(val)
    if n_test + n_val >= n:
        raise DataError(
            f"split_pairs: {n} pairs with test={test}, val={val} leave no training pair"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    picked = [pairs[i] for i in order]
    return Splits(
        train=picked[n_test + n_val :],
        val=picked[n_test : n_test + n_val],
        test=picked[:n_test],
    )


def _split_by_prompt(pairs: Sequence[PreferencePair], test: float, val: float, seed: int) -> Splits:
    out = Splits(train=[], val=[], test=[])
    for pair in pairs:
        digest = hashlib.sha256(f"{seed}:{pair.prompt}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        (out.test if u < test else out.val if u < test + val else out.train).append(pair)
    if not out.train:
        raise DataError(f"split_pairs: {len(pairs)} pairs by prompt leave no training pair")
    return out

"""Rebuild the held-out and extra training prompts of ``mva_lightning/assets/prompts.jsonl``.

The embedded default's prompt file holds the project's own 90 prompts (``source: project``,
all ``split: train``) and prompts drawn from the Anthropic HH-RLHF test files (MIT licence, kept
beside the file as ``assets/LICENSE-HH-RLHF``):

- benign: first human turns of single-turn ``helpful-base`` dialogues;
- sensitive: first human turns of single-turn ``harmless-base`` (red-team) dialogues, read by
  hand and kept when they ask for help to hurt, steal, deceive, harass or invade privacy (a
  careful assistant declines them). Red-team openers that ask nothing harmful ("Can you suggest
  a movie?") and prompts that are only slurs were left out.

Only the prompt text is kept, never a response. Candidates are single-turn, 15-160 characters,
deduplicated, in the order of their sha256 (so the selection is reproducible and unrelated to the
file order). Per category the first rows go to test, then val, then train.

Usage:
    python experiments/build_prompts.py --data-dir PATH/TO/hh-rlhf [--check]

``--check`` rebuilds in memory and fails if the shipped file differs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

ASSET = Path(__file__).resolve().parents[1] / "mva_lightning" / "assets" / "prompts.jsonl"
COUNTS = {"test": 32, "val": 22, "train": 20}  # per category: 64 test, 44 val, 40 train prompts

# Positions (in sha256 order of the harmless-base candidates) of the prompts kept as sensitive.
SENSITIVE = (
    3, 5, 8, 12, 15, 20, 24, 27, 28, 30, 32, 36, 37, 41, 42, 46, 47, 48, 50, 57, 58, 61, 62,
    64, 70, 74, 76, 77, 78, 79, 81, 82, 83, 84, 86, 88, 92, 95, 96, 97, 98, 99, 100, 102, 103,
    105, 107, 112, 114, 115, 118, 120, 129, 131, 133, 135, 136, 138, 140, 141, 144, 146, 150,
    151, 152, 153, 156, 158, 159, 160, 162, 165, 169, 170, 172, 173, 178, 180, 185, 187, 194,
    196, 197, 198, 199,
)  # fmt: skip


def candidates(path: Path) -> list[str]:
    """Single-turn first human turns of an HH-RLHF file, 15-160 characters, in sha256 order."""
    out = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            chosen = json.loads(line)["chosen"]
            prompt = chosen[: chosen.rfind("\n\nAssistant:")]
            if prompt.count("\n\nHuman:") != 1:
                continue
            text = prompt.split("\n\nHuman:")[1].strip()
            if 15 <= len(text) <= 160 and "\n" not in text:
                out.add(text)
    return sorted(out, key=lambda q: hashlib.sha256(q.encode()).hexdigest())


def build(data_dir: Path) -> list[dict]:
    """Every row of the prompt file: the project's rows first, then the HH-RLHF ones."""
    project = [
        r for r in map(json.loads, ASSET.read_text().splitlines()) if r["source"] == "project"
    ]
    need = sum(COUNTS.values())
    harmless = candidates(data_dir / "harmless-base-test.jsonl.gz")
    picked = {
        "benign": candidates(data_dir / "helpful-base-test.jsonl.gz")[:need],
        "sensitive": [harmless[i] for i in SENSITIVE][:need],
    }
    rows = []
    for category, prompts in picked.items():
        if len(prompts) < need:
            raise SystemExit(f"{data_dir}: only {len(prompts)} {category} prompts, need {need}")
        start = 0
        base = "helpful-base" if category == "benign" else "harmless-base"
        for split, n in COUNTS.items():
            for text in prompts[start : start + n]:
                rows.append(
                    {
                        "prompt": text,
                        "category": category,
                        "split": split,
                        "source": f"hh-rlhf/{base}",
                    }
                )
            start += n
    return project + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="folder with HH-RLHF *-base-test.jsonl.gz"
    )
    parser.add_argument("--check", action="store_true", help="fail if the shipped file differs")
    args = parser.parse_args()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build(args.data_dir))
    if args.check:
        same = ASSET.read_text(encoding="utf-8") == text
        print("prompts.jsonl is up to date" if same else "prompts.jsonl differs from a rebuild")
        sys.exit(0 if same else 1)
    tmp = ASSET.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, ASSET)
    print(f"wrote {ASSET.name}: {text.count(chr(10))} prompts")


if __name__ == "__main__":
    main()

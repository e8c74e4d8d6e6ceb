"""Text helpers shared by the scorers: the last human turn of a transcript, word counts."""

from __future__ import annotations

import re

from mva_lightning.data.collate import transcript_to_messages

_WORD = re.compile(r"\w+")


def last_human_turn(prompt: str) -> str:
    """The last user message of an HH transcript, or the whole stripped prompt if it has none.

    ``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: and you?\\n\\nAssistant:"`` gives
    ``"and you?"``. Plain prompts without turn markers are returned stripped.
    """
    users = [m["content"] for m in transcript_to_messages(prompt) if m["role"] == "user"]
    return users[-1] if users else prompt.strip()


def word_count(text: str) -> int:
    """Number of words (runs of letters, digits or underscores) in ``text``."""
    return len(_WORD.findall(text))

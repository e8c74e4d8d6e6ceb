"""Errors a person can read: the commands report a bad input in one line, not a traceback.

Both commands (``python -m mva_lightning`` and ``python -m mva_lightning.sweep``) run their work
inside :func:`user_errors`. An exception that says the user's input is wrong (a bad config value,
bad data, a missing file, a scorer that cannot load; see :func:`user_error`) is printed as
``error: <message>`` (and ``hint: <hint>`` where the exception has a ``hint`` attribute) on
stderr, and the command exits with status 1. Anything else is a bug and keeps its traceback, as
does every error when ``HYDRA_FULL_ERROR=1`` (Hydra's switch for the whole traceback).

The catch sits inside the ``@hydra.main`` task function: Hydra would otherwise print
"Error executing job ..." with a traceback. A ``SystemExit`` passes through Hydra untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

FULL_ERROR = "HYDRA_FULL_ERROR"
# omegaconf's detail lines under the message (the key is kept, the rest dropped)
_DETAIL = ("full_key:", "object_type=", "reference_type=")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "your input is wrong" (imported here, on demand)."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    from mva_lightning.assembly import ConfigError
    from mva_lightning.data.sources import DataError
    from mva_lightning.scorers.base import ScorerUnavailable

    return (
        ConfigError,
        DataError,
        FileNotFoundError,
        ScorerUnavailable,
        OmegaConfBaseException,  # a missing (???) key, a bad interpolation, a wrong type
        ConfigCompositionException,
        MissingConfigException,  # an unknown config group option
        OverrideParseException,
    )


def user_error(
    err: BaseException, extra: tuple[type[BaseException], ...] = ()
) -> BaseException | None:
    """The user error behind ``err``, or None if ``err`` is not one (a bug: keep the traceback).

    Hydra's ``instantiate`` wraps what a ``_target_`` raises in an ``InstantiationException``;
    such a wrapper counts as its cause.

    Args:
        err: The exception raised.
        extra: More exception types that count as user errors for this command.
    """
    from hydra.errors import InstantiationException

    types = (*user_error_types(), *extra)
    seen = 0
    while isinstance(err, InstantiationException) and err.__cause__ is not None and seen < 8:
        err, seen = err.__cause__, seen + 1
    return err if isinstance(err, types) else None


def error_lines(err: BaseException) -> list[str]:
    """``["error: <message>"]``, plus ``"hint: <hint>"`` if ``err`` has a ``hint`` attribute.

    The message is put on one line: omegaconf's ``full_key:`` detail becomes ``(key K)``, its
    other detail lines are dropped, and any remaining lines are joined with spaces.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        lines = [type(err).__name__]
    key = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), ""
    )
    message = " ".join(line for line in lines if not line.startswith(_DETAIL))
    if key and key not in message:
        message += f" (key {key})"
    out = [f"error: {message}"]
    hint = getattr(err, "hint", None)
    if hint:
        out.append("hint: " + " ".join(str(hint).split()))
    return out


def full_error() -> bool:
    """Whether ``HYDRA_FULL_ERROR=1`` asks for whole tracebacks."""
    return os.environ.get(FULL_ERROR) == "1"


def _multirun() -> bool:
    # In a multirun, a failed job is recorded and the others still run: leave it to Hydra.
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra app around (a plain call)
        return False


@contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Report a user error raised in the block in one line on stderr and exit with status 1.

    Args:
        extra: More exception types that count as user errors (see :func:`user_error`).

    Raises:
        SystemExit: Status 1, after printing the error line(s), for a user error (unless
            ``HYDRA_FULL_ERROR=1`` or Hydra runs a multirun: then the error is re-raised).
    """
    try:
        yield
    except Exception as err:
        user = user_error(err, extra)
        if user is None or full_error() or _multirun():
            raise
        sys.stdout.flush()
        print("\n".join(error_lines(user)), file=sys.stderr, flush=True)
        raise SystemExit(1) from None

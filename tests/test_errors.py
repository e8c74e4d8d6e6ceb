"""The commands report a bad input in one line (mva_lightning.errors), not a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import toy_overrides, write_hh_file

from mva_lightning.errors import error_lines, user_error, user_errors

# a log line: Hydra's "[time][logger][LEVEL] - ..." or Lightning's "INFO: ..."
LOG_LINE = re.compile(r"^(\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\]|(DEBUG|INFO|WARNING):)")


def _main(cwd, *overrides, **env):
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "mva_lightning", *overrides],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _message_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def test_a_missing_data_file_is_one_line(tmp_path):
    data = {
        "helpful": tmp_path / "no_such_pairs.jsonl",  # fails before any model is loaded
        "harmless": write_hh_file(tmp_path / "harmless.jsonl.gz", 24, "I cannot help.", "Sure!"),
    }
    overrides = toy_overrides(data, tmp_path / "out")
    done = _main(tmp_path, *overrides)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = _message_lines(done.stderr)
    assert 1 <= len(lines) <= 2, done.stderr
    assert lines[0].startswith("error: ") and "no_such_pairs.jsonl" in lines[0]
    assert "does not exist" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout

    full = _main(tmp_path, *overrides, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1
    assert "Traceback" in full.stderr and "DataError" in full.stderr
    assert "no_such_pairs.jsonl" in full.stderr


def test_an_unknown_config_option_stays_short(tmp_path):
    # Hydra reports composition errors itself, before the task function: no traceback
    done = _main(tmp_path, "value=nope")
    assert done.returncode == 1
    assert "Could not find 'value/nope'" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the helper


def test_user_errors_prints_one_line_and_exits_1(capsys, monkeypatch):
    from mva_lightning.assembly import ConfigError

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    err = ConfigError("required config keys are unset (???): value.custom.source.files")
    err.hint = "set value.custom.source.files=[path/to/pairs.jsonl]"
    with pytest.raises(SystemExit) as exit_, user_errors():
        raise err
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: required config keys are unset (???): value.custom.source.files",
        "hint: set value.custom.source.files=[path/to/pairs.jsonl]",
    ]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), user_errors():
        raise ConfigError("x")


def test_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(KeyError), user_errors():
        raise KeyError("a bug")
    with pytest.raises(ValueError), user_errors():
        raise ValueError("not a user error for the main command")
    with pytest.raises(SystemExit), user_errors(ValueError):  # but for the sweep command
        raise ValueError("bad sweep settings")


def test_user_error_unwraps_instantiate_and_omegaconf_messages():
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from mva_lightning.data.sources import DataError
    from mva_lightning.scorers.base import ScorerUnavailable

    cause = DataError("f.jsonl, line 3: not valid JSON")
    try:
        raise InstantiationException("Error in call to target 'x'") from cause
    except InstantiationException as wrapped:
        assert user_error(wrapped) is cause
    assert user_error(RuntimeError("bug")) is None
    assert isinstance(user_error(ScorerUnavailable("no hub")), ScorerUnavailable)
    assert isinstance(user_error(FileNotFoundError("x")), FileNotFoundError)

    cfg = OmegaConf.create({"a": {"b": "???"}, "x": "${nope}"})
    with pytest.raises(Exception) as missing:
        _ = cfg.a.b
    assert user_error(missing.value) is missing.value
    assert error_lines(missing.value) == ["error: Missing mandatory value: a.b"]
    with pytest.raises(Exception) as interpolation:
        _ = cfg.x
    assert error_lines(interpolation.value) == ["error: Interpolation key 'nope' not found (key x)"]

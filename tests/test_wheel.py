"""The package installs as a wheel: the Hydra configs ship inside it and jobs run anywhere.

The wheel is built from a copy of the sources (the shared working tree gets no ``build/``) and
installed into a scratch folder; every command then runs from a folder outside the repository
with the scratch folder FIRST on PYTHONPATH, ahead of an editable install of the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, toy_overrides, write_hh_file
from omegaconf import OmegaConf

CONF = REPO / "mva_lightning" / "conf"

# A user's own value in a config folder outside the package, found through hydra.searchpath;
# its scorer comes from the package's scorer/ group.
USER_VALUE = """\
defaults:
  - /scorer@my_value.scorer: sentiment

my_value:
  source:
    _target_: mva_lightning.data.sources.jsonl_pairs
    files: [kind.jsonl]   # relative to the working directory
  max_pairs: null
"""


def _python(args: list[str], cwd: Path, first: Path | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``, with ``first`` (the scratch install) first on PYTHONPATH."""
    path = os.pathsep.join(str(p) for p in (first, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of pyproject.toml, README.md and the package."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "mva_lightning", src / "mva_lightning", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    build = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    _check(_python(build, src))
    (path,) = out.glob("mva_lightning-*.whl")
    return path


@pytest.fixture(scope="module")
def scratch(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a scratch folder (not site-packages)."""
    target = tmp_path_factory.mktemp("scratch")
    install = ["-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    _check(_python([*install, str(wheel)], target))
    return target


@pytest.fixture(scope="module")
def job(scratch, tmp_path_factory) -> Path:
    """``python -m mva_lightning`` on toy data from a folder outside the repository.

    One value from the package's configs (helpful), one from the user's folder (my_value).
    """
    cwd = tmp_path_factory.mktemp("work")
    data = {"helpful": write_hh_file(cwd / "helpful.jsonl.gz", 24, "Here is a full answer", "No.")}
    kind = [
        {"prompt": f"Q{i}?", "chosen": f" A kind answer {i}.", "rejected": " No."}
        for i in range(24)
    ]
    (cwd / "kind.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kind))
    (cwd / "my_conf" / "value").mkdir(parents=True)
    (cwd / "my_conf" / "value" / "my_value.yaml").write_text(USER_VALUE)
    run = cwd / "run"
    overrides = [
        o
        for o in toy_overrides({**data, "harmless": None}, run)
        if not o.startswith(("value=", "value.harmless"))
    ]
    overrides += [
        "hydra.searchpath=[file://./my_conf]",
        "value=[helpful,my_value]",
        f"hydra.run.dir={run}",
        "extrapolation.candidates.step=0.5",  # 4 candidates
    ]
    _check(_python(["-m", "mva_lightning", *overrides], cwd, scratch))
    return run


def test_wheel_ships_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"mva_lightning/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert "mva_lightning/conf/config.yaml" in configs
    assert configs <= names, sorted(configs - names)
    assert "mva_lightning/assets/prompts.jsonl" in names
    assets = REPO / "mva_lightning" / "assets"  # prompts, licences, the reward models' heads
    shipped = {
        f"mva_lightning/assets/{p.relative_to(assets).as_posix()}"
        for p in assets.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped <= names, sorted(shipped - names)


def test_installed_wheel_runs_a_job_outside_the_repository(scratch, job):
    where = _check(
        _python(["-c", "import mva_lightning; print(mva_lightning.__file__)"], job, scratch)
    )
    assert Path(where.strip()).is_relative_to(scratch), f"imported from {where.strip()}"
    assert not job.is_relative_to(REPO)
    for value in ("helpful", "my_value"):  # a package config and a user config
        assert (job / "adapters" / value / "adapter_model.safetensors").is_file()
    cfg = OmegaConf.load(job / "config.yaml")
    assert cfg.value.my_value.scorer == OmegaConf.load(CONF / "scorer" / "sentiment.yaml")
    assert (job / "extrapolation" / "pareto.json").is_file()


# The sweep command over a finished run (`python -m mva_lightning.sweep run_dir=DIR`): it runs
# once the installed package has mva_lightning/sweep/__main__.py.
def test_installed_wheel_reruns_the_sweep(scratch, job):
    if not (scratch / "mva_lightning" / "sweep" / "__main__.py").is_file():
        pytest.skip("sweep command not present")
    pareto = job / "extrapolation" / "pareto.json"
    pareto.unlink()  # rebuilt from the run folder (the scored candidates are reused)
    _check(_python(["-m", "mva_lightning.sweep", f"run_dir={job}"], job.parent, scratch))
    assert pareto.is_file()

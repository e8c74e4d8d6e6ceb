"""Every `python -m mva_lightning ...` command the README suggests composes (overrides valid)."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO, compose


def readme_commands() -> list[str]:
    """The main command's lines in the README's bash blocks (continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#", line, maxsplit=1)[0].strip()
            m = re.search(r"python -m mva_lightning(\s.*)?$", line)
            if m and not re.match(r"\.\w", line[m.start() + len("python -m mva_lightning") :]):
                commands.append((m.group(1) or "").strip())
    return commands


def first_of_each_sweep(tokens: list[str]) -> list[str]:
    """Hydra overrides with every multirun sweep (a,b,c) replaced by its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for override in OverridesParser.create().parse_overrides(tokens):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(override.input_line)
    return out


COMMANDS = readme_commands()


def test_the_readme_suggests_commands():
    assert len(COMMANDS) >= 8 and "" in COMMANDS  # the main job itself is one of them


@pytest.mark.parametrize("args", COMMANDS)
def test_readme_command_composes(args):
    # placeholders the user fills in (<run>) become a plain folder name
    tokens = [re.sub(r"<(\w+)>", r"\1", t) for t in shlex.split(args)]
    tokens = [t for t in tokens if t not in ("-m", "--multirun")]
    if any("my_conf" in t for t in tokens):
        pytest.skip("needs the user's own config folder (tests/test_wheel.py runs this form)")
    cfg = compose([*first_of_each_sweep(tokens), "paths.output_dir=out"])
    assert cfg.value and cfg.model.loader._target_


# The overrides the project's error messages suggest (grep the package for "use ..."): each must
# compose, alone or with what the message says it applies to.
SUGGESTED = [
    ["model=tiny"],
    ["model=smollm2"],
    ["mi=none"],
    ["mi.alpha=0"],
    ["mi=hsic"],
    ["extrapolation=none"],
    ["+experiment=hh_3values", "scorer@value.humor.scorer=sentiment"],
    ["method=dpo", "mi=none"],
    *(  # hf_reward.OFFLINE_HINT, for each value of the paper's experiment
        ["+experiment=hh_2values", f"scorer@value.{v}.scorer={s}"]
        for v in ("helpful", "harmless")
        for s in ("rm_helpful", "rm_harmless", "relevance", "harmlessness", "sentiment")
    ),
]


@pytest.mark.parametrize("overrides", SUGGESTED, ids=" ".join)
def test_overrides_suggested_by_errors_compose(overrides):
    cfg = compose([*overrides, "paths.output_dir=out"])
    assert cfg.value

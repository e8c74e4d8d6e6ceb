"""The end-of-run summary: where the results are, what the front achieved, with intervals.

:func:`summary` reads a run folder (``config.yaml``, ``extrapolation/pareto.json``) and returns a
short Markdown text; :func:`mva_lightning.train.train` writes it to ``<run>/summary.md`` and prints
it as the run's last words. Tables:

- the front: size and hypervolume with its interval;
- held-out (report split) scores per value: the base and the front point with the best selection
  score, the paired difference and whether its interval excludes 0 ("no detectable difference"
  otherwise);
- behaviours (indicators such as the refusal rate on sensitive prompts): the base and every
  front point, with intervals and the paired difference from the base.

``python -m mva_lightning.report RUN_DIR`` prints it for any finished run.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _num(x: float) -> str:
    return f"{x:.3g}"


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "-"


def _diff(d: float, ci: Sequence[float] | None, significant: bool | None) -> str:
    word = "significant" if significant else "no detectable difference"
    return f"{d:+.3g} {_ci(ci)} ({word})"


def _w(w: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in w) + ")"


def summary(run_dir: str | os.PathLike, sweep_dir: str = "extrapolation") -> str:
    """The Markdown summary of a finished run (see the module docstring).

    Args:
        run_dir: The run folder.
        sweep_dir: Its sweep's folder (``extrapolation.output_subdir``).
    """
    run = Path(run_dir)
    lines = [f"# Run {run}", ""]
    manifest_path = run / sweep_dir / "pareto.json"
    adapters = run / "adapters"
    if adapters.is_dir():
        folders = sorted(p.name for p in adapters.iterdir() if p.is_dir())
        lines.append(f"- value vectors (PEFT adapters): `{adapters}/` ({', '.join(folders)})")
    if not manifest_path.is_file():
        lines += ["- no Pareto sweep in this run (extrapolation=none or not finished)", ""]
        return "\n".join(lines)
    m = json.loads(manifest_path.read_text())
    values, split = m["values"], m.get("report_split")
    names = m.get("adapters") or values  # what w weights: the values, or a shared adapter
    front = [r for r in m["rows"] if r.get("on_front")]
    hv = f"{_num(m['hypervolume'])} {_ci(m.get('hypervolume_ci'))}"
    lines += [
        f"- Pareto front: {len(front)} of {len(m['rows'])} candidates, hypervolume {hv} "
        f"(selection split {m['objective'].get('split', 'val')})",
        f"- plot: `{manifest_path.parent / 'pareto.png'}`; table: `{manifest_path}`",
        f"- front checkpoints: `{manifest_path.parent / 'checkpoints'}/w_.../` (PEFT adapter "
        "folders, each with a model card)",
    ]
    if front:
        w = [front[0][f"w/{a}"] for a in names]
        lines.append(
            f"- load a point: `from mva_lightning import load_policy; "
            f"model, tok = load_policy('{run}', {w})`"
        )
    improvement = m.get("improvement") or {}
    if improvement:
        lines += [
            "",
            f"## Held-out scores ({split}): base vs the front point best on each value",
            "",
            "| value | base | best front point | w | difference [95% CI] |",
            "|---|---|---|---|---|",
        ]
        base = m["base_scores"]
        for v, imp in improvement.items():
            best_row = next(
                (r for r in m["rows"] if [r.get(f"w/{a}") for a in names] == imp["w"]), {}
            )
            lines.append(
                f"| {v} | {_num(imp['base'])} {_ci(base.get(f'{split}/{v}/ci'))} "
                f"| {_num(imp['best'])} {_ci(best_row.get(f'{split}/{v}/ci'))} | {_w(imp['w'])} "
                f"| {_diff(imp['difference'], imp.get('ci'), imp.get('significant'))} |"
            )
    for name, table in (m.get("behaviour") or {}).items():
        lines += [
            "",
            f"## {name} ({split}, n = {table[0]['n']}): base and every front point",
            "",
            f"| w | {name} [95% CI] | difference from base [95% CI] |",
            "|---|---|---|",
        ]
        for i, rec in enumerate(table):
            diff = (
                "-"
                if i == 0
                else _diff(rec["difference"], rec["difference_ci"], rec["significant"])
            )
            label = "base " + _w(rec["w"]) if i == 0 else _w(rec["w"])
            lines.append(f"| {label} | {_num(rec['rate'])} {_ci(rec['ci'])} | {diff} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mva_lightning.report RUN_DIR``: print a finished run's summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.exit("usage: python -m mva_lightning.report RUN_DIR")
    if not Path(args[0]).is_dir():
        sys.exit(f"error: {args[0]}: no such run folder")
    print(summary(args[0]))


if __name__ == "__main__":
    main()

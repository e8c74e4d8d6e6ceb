"""Golden runs: the same seed gives the same value vectors, front and diagnostics as recorded.

Three small runs of the tiny model on the toy data (two values, the paper's grid sweep scored by
implicit reward): HSIC with the sequential schedule, MINE, and the joint schedule. Their
adapters, ``pareto.json`` and ``interference.json`` were recorded before the package was
restructured (``pareto.json`` again when the sweep's row weights were fused, which moved the
implicit-reward margins by float rounding, at most 8e-7, and nothing else); a refactor that
changes any of them (one bit of one adapter tensor) changes behaviour and fails here. Record
again, deliberately, only when behaviour is meant to change::

    MVA_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py

Bit equality holds on the machine kind that recorded the files. Floating-point kernels may round
differently on another processor, so there the comparison allows a tight tolerance instead, and
says so (``GOLDEN/machine.json`` names the recording processor).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from conftest import compose, toy_overrides
from safetensors.torch import load_file, save_file

from mva_lightning.train import train

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("MVA_RECORD_GOLDEN") == "1"
VARIANTS = {
    "hsic": [],
    "mine": ["mi=mine", "mi.estimator.hidden=16", "mi.estimator.head_steps=2"],
    "joint": ["train.schedule=joint"],
}
COMMON = [
    "trainer.max_epochs=2",
    "optimizer.lr=1e-3",
    "extrapolation.candidates.values=[0.0,0.5,1.0,1.5]",
    "callbacks.diagnostics.mine_steps=50",
]
# Wall-clock fields of the manifest, and the cache key (it hashes settings' spelling, not scores)
VOLATILE = {"seconds", "candidates_per_s", "fingerprint"}


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def _outputs(run: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    tensors = {}
    for v in ("helpful", "harmless"):
        state = load_file(run / "adapters" / v / "adapter_model.safetensors")
        tensors.update({f"{v}/{k}": t for k, t in state.items()})
    pareto = json.loads((run / "extrapolation" / "pareto.json").read_text())
    interference = json.loads((run / "diagnostics" / "interference.json").read_text())
    return tensors, _stable(pareto), interference


def _record(folder: Path, tensors, pareto, interference) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapters.safetensors"))
    (folder / "pareto.json").write_text(json.dumps(pareto, indent=2, sort_keys=True) + "\n")
    (folder / "interference.json").write_text(json.dumps(interference, indent=2) + "\n")
    (GOLDEN / "machine.json").write_text(json.dumps({"processor": _machine()}) + "\n")


def _close(a, b, exact: bool) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], exact) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, exact) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and not exact:
        return abs(a - b) <= 1e-6 + 1e-5 * abs(b)
    return a == b


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_seed_same_adapters_front_and_diagnostics(variant, toy_data, tmp_path):
    run = tmp_path / variant
    train(compose(toy_overrides(toy_data, run, *COMMON, *VARIANTS[variant])))
    tensors, pareto, interference = _outputs(run)
    folder = GOLDEN / variant
    if RECORD:
        _record(folder, tensors, pareto, interference)
    if not (folder / "adapters.safetensors").is_file():
        pytest.fail(f"no golden files in tests/golden/{variant}: record them (module docstring)")
    recorded = json.loads((GOLDEN / "machine.json").read_text())["processor"]
    exact = recorded == _machine()
    golden = load_file(str(folder / "adapters.safetensors"))
    assert golden.keys() == tensors.keys()
    for key, want in golden.items():
        if exact:
            assert torch.equal(tensors[key], want), f"{variant}: {key} differs from the golden run"
        else:  # another processor: its kernels may round differently
            torch.testing.assert_close(tensors[key], want, atol=1e-6, rtol=1e-5, msg=key)
    assert any(t.abs().sum() > 0 for k, t in golden.items() if "lora_B" in k)  # it trained
    want_pareto = json.loads((folder / "pareto.json").read_text())
    assert _close(pareto, want_pareto, exact), f"{variant}: pareto.json differs from the golden"
    want_interference = json.loads((folder / "interference.json").read_text())
    assert _close(interference, want_interference, exact), f"{variant}: interference differs"

"""Every method's run folder reloads (load_policy) and reruns its own sweep (the sweep command).

One tiny run per file in conf/method/ (a new method is covered by adding its file), shared by
the tests of this module. Shared-adapter baselines (DPO, DPO-LW, DPO-SeqT, MODPO) save
``adapters/policy/``; the others one ``adapters/<value>/`` per value.
"""

import json
import shutil
from pathlib import Path
from shlex import quote as q

import pytest
import torch
from conftest import REPO, compose, toy_overrides, write_hh_file
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mva_lightning.loading import (
    export_merged,
    load_policy,
    resume_command,
    run_adapters,
    run_config,
)
from mva_lightning.model import lora, panacea
from mva_lightning.sweep.cli import rerun
from mva_lightning.train import train

METHODS = sorted(p.stem for p in (REPO / "mva_lightning" / "conf" / "method").glob("*.yaml"))
IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119], [9, 8, 7, 6, 5, 4, 3, 2]])
FAST = [
    "trainer.max_steps=1",  # per stage
    "optimizer.lr=1e-2",  # one step moves the adapters visibly
    "callbacks=none",
    "extrapolation.candidates.step=0.5",  # grid: 4 candidates, simplex: 3, baselines: [[1.0]]
    "extrapolation.bootstrap.resamples=20",
    "extrapolation.samples.num_prompts=1",
    "extrapolation.samples.max_new_tokens=2",
    "extrapolation.progress=false",
]


class Runs:
    """Trained tiny runs, one per method, made on first use (MODPO's margin: the SOUP run)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = {
            "helpful": write_hh_file(root / "helpful.jsonl.gz", 24, "Here is a full answer", "No."),
            "harmless": write_hh_file(root / "harmless.jsonl.gz", 24, "I cannot help.", "Sure!"),
        }
        self.done: dict[str, Path] = {}

    def __call__(self, method: str) -> Path:
        if method not in self.done:
            out = self.root / method
            extra = [f"method={method}", *FAST]
            node = compose(["model=tiny", f"method={method}"]).method
            if OmegaConf.is_missing(node, "margin_from"):  # MODPO: a finished run's adapters/
                extra.append(f"method.margin_from={self(self._margin_source())}/adapters")
            train(compose(toy_overrides(self.data, out, *extra)))
            self.done[method] = out
        return self.done[method]

    @staticmethod
    def _margin_source() -> str:
        return "soup" if "soup" in METHODS else "mva"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("methods"))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base_logits(run):
    return _logits(instantiate(run_config(run).model.loader).model.eval())


def _manifest(run):
    return json.loads((run / "extrapolation" / "pareto.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reloads_and_reruns_its_sweep(method, runs):
    from peft import PeftModel

    run = runs(method)
    cfg = run_config(run)
    names = run_adapters(cfg)
    is_panacea = method == "panacea"  # one SVD-LoRA adapter; w is its preference input
    folders = ["panacea"] if is_panacea else sorted(names)
    assert sorted(p.name for p in (run / "adapters").iterdir()) == folders

    def weights(model) -> dict[str, float]:
        if is_panacea:
            return dict(zip(names, panacea.get_preference(model), strict=True))
        return lora.get_weights(model)

    manifest = _manifest(run)
    assert (manifest["adapters"] or manifest["values"]) == names

    # load_policy at each front point gives the logits of the checkpoint the run's own sweep
    # wrote from the trained policy in memory (a plain PEFT adapter on a fresh base).
    front = [r for r in manifest["rows"] if r["on_front"] and r["checkpoint"]]
    assert front
    for row in front:
        w = {a: row[f"w/{a}"] for a in names}
        model, _ = load_policy(run, w)
        assert weights(model) == pytest.approx(w)
        base = instantiate(cfg.model.loader).model
        saved = PeftModel.from_pretrained(base, run / row["checkpoint"]).eval()
        torch.testing.assert_close(_logits(model), _logits(saved), atol=1e-5, rtol=1e-5)
    model, tokenizer = load_policy(run)  # w = 1 for every adapter: the trained model
    assert weights(model) == dict.fromkeys(names, 1.0) and not model.training
    assert tokenizer.pad_token_id is not None
    assert not torch.allclose(_logits(model), _base_logits(run), atol=1e-4)

    # The sweep command on the run's own settings: same candidates, adapters and scores (every
    # one read back from the run's cache: nothing scored again).
    again = rerun(run, None, "cpu")
    assert again.adapters == manifest["adapters"]
    assert (again.scored, again.skipped) == (0, len(manifest["rows"]) + 1)  # + the base
    assert again.rows() == manifest["rows"]
    assert again.hypervolume == manifest["hypervolume"]
    assert _manifest(run)["rows"] == manifest["rows"]


def _shared_method():
    shared = [m for m in METHODS if compose(["model=tiny", f"method={m}"]).method.shared_adapter]
    if not shared:
        pytest.skip("no shared-adapter method in conf/method/")
    return "dpo_lw" if "dpo_lw" in shared else shared[0]


def test_shared_adapter_preference_forms(runs, tmp_path):
    run = runs(_shared_method())
    shared = run_config(run).method.shared_adapter
    trained = _logits(load_policy(run)[0])
    for preference in ([1.0], (1.0,), {shared: 1.0}):
        model, _ = load_policy(run, preference)
        assert lora.get_weights(model) == {shared: 1.0}
        torch.testing.assert_close(_logits(model), trained, rtol=0, atol=0)
    torch.testing.assert_close(_logits(load_policy(run, [0.0])[0]), _base_logits(run))
    assert lora.get_weights(load_policy(run, {shared: 2.0})[0]) == {shared: 2.0}
    with pytest.raises(ValueError, match=rf"has 2 entries; expected 1: .*'{shared}'.*helpful"):
        load_policy(run, [0.5, 0.5])  # a per-value list: this run is one model
    with pytest.raises(KeyError, match=rf"\['helpful'\] have no adapter; .*'{shared}'"):
        load_policy(run, {"helpful": 1.0})
    with pytest.raises(TypeError, match="list of floats or a mapping"):
        load_policy(run, "1.0")
    out = export_merged(run, None, tmp_path / "merged")  # the trained model, merged
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["mva", "shared"])
def test_a_run_without_adapters_names_the_command_that_resumes_it(method, runs, tmp_path):
    source = runs(_shared_method() if method == "shared" else "mva")
    run = Path(shutil.copytree(source, tmp_path / "killed", symlinks=True))
    shutil.rmtree(run / "adapters")  # stopped before it wrote them: checkpoints, no adapters
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    for call in (lambda: load_policy(run), lambda: rerun(run, None, "cpu")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{run / 'adapters'}: no value vectors yet")
        assert "the run did not finish training" in message and "\n" not in message
        # no Hydra record (the run came from train(cfg)): its saved config is the config
        assert message.endswith(
            f"resume it with: python -m mva_lightning --config-path {q(str(run))} "
            f"--config-name config {q(f'hydra.run.dir={run}')} {q(f'ckpt_path={checkpoint}')}"
        )

    # What that command does, in process: the checkpoint's finished training is restored and
    # the value vectors written; the run then loads as the uninterrupted one did.
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.paths.output_dir, cfg.logger, cfg.ckpt_path = str(run), None, str(checkpoint)
    train(cfg)
    assert sorted(p.name for p in (run / "adapters").iterdir()) == sorted(run_adapters(cfg))
    torch.testing.assert_close(_logits(load_policy(run)[0]), _logits(load_policy(source)[0]))


def test_resume_command_forms(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("value:\n  helpful: {}\n")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        load_policy(run)
    checkpoint = run / "checkpoints" / "epoch=0-step=10.ckpt"
    checkpoint.write_bytes(b"")
    # the newest checkpoint when there is no last.ckpt; '=' in it: a quoted Hydra value
    with pytest.raises(FileNotFoundError, match="resume it with") as err:
        load_policy(run)
    assert str(err.value).endswith(q(f"ckpt_path='{checkpoint}'"))
    # A run of the command: its own overrides, without the output folder or checkpoint it set.
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(
        "- model=tiny\n- method=dpo_lw\n- method.weights=[0.2,0.8]\n- paths.output_dir=/x\n"
        "- ckpt_path=/old.ckpt\n"
    )
    assert resume_command(run, checkpoint) == (
        "python -m mva_lightning model=tiny method=dpo_lw 'method.weights=[0.2,0.8]' "
        + q(f"hydra.run.dir={run}")
        + " "
        + q(f"ckpt_path='{checkpoint}'")
    )
    # ... but not one composed from its own saved config (a resumed run): that config again
    (run / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    config_sources:\n"
        f"    - {{path: {run}, schema: file, provider: main}}\n"
    )
    assert f"--config-path {q(str(run))} --config-name config" in resume_command(run, checkpoint)

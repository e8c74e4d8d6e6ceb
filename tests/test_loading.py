"""The concatenated adapter, load_policy for any w, and the merged full-weight export."""

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mva_lightning.io import write_text
from mva_lightning.loading import export_merged, load_policy, preference_weights, write_adapter
from mva_lightning.model import lora

VALUES = ["helpful", "harmless"]
IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119], [9, 8, 7, 6, 5, 4, 3, 2]])
WEIGHTS = [{"helpful": 1.5, "harmless": -0.5}, {"helpful": 2.0, "harmless": 0.3}]


def _randomise_b(policy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(policy):
            for v in lora.value_names(policy):
                w = layer.lora_B[v].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as train() leaves it (config.yaml + adapters/<value>/), and its policy."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(
        [
            "model=tiny",
            "value=[helpful,harmless]",
            f"paths.output_dir={run_dir}",
            "extrapolation=none",
        ]
    )
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    backbone = instantiate(cfg.model.loader)
    policy = lora.add_value_vectors(backbone.model, VALUES, **cfg.model.lora)
    _randomise_b(policy)
    lora.save_value_vectors(policy, run_dir / "adapters", VALUES)
    return run_dir, policy.eval(), cfg


def test_concatenated_adapter_loads_with_plain_peft_to_the_same_logits(run, tmp_path):
    from peft import PeftModel

    run_dir, policy, cfg = run
    fresh = None
    for i, weights in enumerate(WEIGHTS):
        config, state = lora.concatenated_adapter(policy, weights)
        assert config.r == 16 and config.lora_alpha == 16  # K * r, scale 1
        folder = write_adapter(config, state, tmp_path / f"adapter{i}")
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
        if fresh is None:  # a fresh base, loading the folder as any PEFT user would
            fresh = PeftModel.from_pretrained(instantiate(cfg.model.loader).model, folder, "0")
        else:
            fresh.load_adapter(folder, adapter_name=str(i))
        fresh.set_adapter(str(i))
        lora.set_weights(policy, weights)
        want = _logits(policy)
        torch.testing.assert_close(_logits(fresh.eval()), want, atol=1e-4, rtol=1e-4)
        with lora.using_weights(policy, {}):
            assert not torch.allclose(_logits(policy), want, atol=1e-3)


def test_concatenated_adapter_rejects_unknown_values(run):
    with pytest.raises(KeyError, match=r"\['humor'\] have no value vector"):
        lora.concatenated_adapter(run[1], {"humor": 1.0})


@pytest.mark.parametrize("preference", [[1.5, -0.5], {"helpful": 2.0}])
def test_load_policy_gives_the_in_memory_logits(run, preference):
    run_dir, policy, _ = run
    model, tokenizer = load_policy(run_dir, preference)
    if not isinstance(preference, dict):
        preference = dict(zip(VALUES, preference, strict=True))
    weights = preference
    lora.set_weights(policy, weights)
    assert lora.get_weights(model) == pytest.approx({"harmless": 0.0, **weights})
    torch.testing.assert_close(_logits(model), _logits(policy), atol=1e-5, rtol=1e-5)
    assert tokenizer.pad_token_id is not None and not model.training


def test_preference_forms():
    assert preference_weights(VALUES, None) == {"helpful": 1.0, "harmless": 1.0}
    assert preference_weights(VALUES, {"harmless": -0.5}) == {"helpful": 0.0, "harmless": -0.5}
    assert preference_weights(VALUES, (2, 0.5)) == {"helpful": 2.0, "harmless": 0.5}
    with pytest.raises(TypeError, match="list of floats or a mapping"):
        preference_weights(VALUES, "1,1")


def test_load_policy_bad_preferences(run, tmp_path):
    run_dir = run[0]
    with pytest.raises(ValueError, match=r"has 3 entries; expected 2"):
        load_policy(run_dir, [1.0, 0.5, 0.2])
    with pytest.raises(KeyError, match=r"\['funny'\] have no value vector"):
        load_policy(run_dir, {"funny": 1.0})
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_policy(tmp_path)
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match=r"value vectors not found: .*helpful"):
        load_policy(tmp_path, [1.0, 1.0])


def test_export_merged_loads_without_peft(run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, policy, _ = run
    out = export_merged(run_dir, [1.5, -0.5], tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    lora.set_weights(policy, {"helpful": 1.5, "harmless": -0.5})
    torch.testing.assert_close(_logits(merged), _logits(policy), atol=1e-4, rtol=1e-4)


def test_package_exports_load_policy_lazily():
    import mva_lightning

    assert mva_lightning.load_policy is load_policy

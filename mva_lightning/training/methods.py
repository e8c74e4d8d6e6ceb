"""Baselines as plain inputs of :class:`~mva_lightning.training.module.MVAModule`.

The methods are described in docs/method.md §7.

Every method trains with the same module; a method differs only in:

- ``adapters``: value -> the LoRA adapter it trains. MVA / SOUP: one adapter per value, named
  after it. DPO-LW, DPO-SeqT, MODPO: every value trains one shared adapter
  (``method.shared_adapter``, e.g. ``policy``).
- ``loss_weights``: value -> weight of its DPO loss. MVA: 1 each. DPO-LW: the preference w
  (loss sum_v w_v L_DPO(theta; D_v)); a value of weight 0 is not trained at all.
- MODPO (Zhou et al. 2023): DPO on the first value k with the margin
  m = (1/w_k) sum_{j != k} w_j (r_j(y_w) - r_j(y_l)) from the FROZEN implicit rewards
  r_j = beta (log pi_j - log pi_0) of the other values' vectors, read from a finished run's
  ``adapters/`` folder (``method.margin_from``) and loaded as adapters ``frozen_<value>``.

- Panacea (Zhong et al. 2024, ``method.preference_input``): no LoRA adapters; one SVD-LoRA
  model (:mod:`mva_lightning.model.panacea`) whose preference input is sampled per batch, loss
  aggregated over the values (``method.aggregation``: linear | tchebycheff). ``panacea`` holds
  its settings for the module (None for every other method).

The schedule (``train.schedule``) gives the stages: sequential for DPO-SeqT, joint for DPO-LW.
:func:`method_inputs` turns the ``method`` config node into those inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

FROZEN_PREFIX = "frozen_"


@dataclass
class MethodInputs:
    """What a method changes in the module; the defaults are MVA.

    Attributes:
        name: Method name (for messages and the comparison table).
        adapters: Value -> trained adapter name.
        loss_weights: Value -> weight of its DPO loss.
        margin_weights: MODPO: frozen adapter name -> w_j (empty: no margin).
        margin_own_weight: MODPO's w_k for the trained value.
        frozen: Frozen adapter name -> PEFT adapter folder to load it from.
        panacea: Panacea's settings (``aggregation``, ``ideal``, ``lambda_init``), or None.
    """

    name: str
    adapters: dict[str, str]
    loss_weights: dict[str, float]
    margin_weights: dict[str, float] = field(default_factory=dict)
    margin_own_weight: float = 1.0
    frozen: dict[str, Path] = field(default_factory=dict)
    panacea: dict | None = None

    @property
    def adapter_names(self) -> list[str]:
        """Distinct trained adapters, in value order."""
        return list(dict.fromkeys(self.adapters.values()))

    def module_kwargs(self) -> dict:
        """Keyword arguments of :class:`MVAModule` for this method."""
        return {
            "adapters": self.adapters,
            "loss_weights": self.loss_weights,
            "margin_weights": self.margin_weights,
            "margin_own_weight": self.margin_own_weight,
            **({"panacea_settings": self.panacea} if self.panacea is not None else {}),
        }


def method_inputs(
    values: Sequence[str],
    name: str = "mva",
    shared_adapter: str | None = None,
    weights: Sequence[float] | None = None,
    margin_from: str | os.PathLike | None = None,
    preference_input: bool = False,
    aggregation: str = "linear",
    ideal: Sequence[float] | None = None,
    lambda_init: float = 0.0,
) -> MethodInputs:
    """The module inputs of a method from its ``method`` config node.

    Args:
        values: Value names of the run, in order.
        name: Method name.
        shared_adapter: One adapter trained by every value (None: one adapter per value).
        weights: Preference w, one per value. Without ``margin_from``: the DPO loss weights
            (DPO-LW). With it: MODPO's w (the first value trains; the others give the margin).
            None: 1 each.
        margin_from: MODPO: a finished run's ``adapters/`` folder holding ``<value>/`` for
            every value but the first.
        preference_input: Panacea: one SVD-LoRA model fed the preference w.
        aggregation: Panacea: ``linear`` (sum_v w_v L_v) or ``tchebycheff``
            (max_v w_v (L_v - z_v)).
        ideal: Panacea, Tchebycheff: z, one per value (None: 0).
        lambda_init: Panacea: initial per-layer preference scale.

    Returns:
        The :class:`MethodInputs`.

    Raises:
        ValueError: Wrong number of weights, negative weights, a bad adapter name, or MODPO
            without the frozen vectors it needs.
    """
    values = list(values)
    if weights is None:
        w = [1.0] * len(values)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(values):
            raise ValueError(
                f"method.weights={list(weights)}: expected {len(values)} entries, one per value "
                f"{values}"
            )
    if any(x < 0 for x in w):
        raise ValueError(f"method.weights={w}: weights must be >= 0")
    if shared_adapter is not None and (
        not shared_adapter or "." in shared_adapter or shared_adapter.startswith(FROZEN_PREFIX)
    ):
        raise ValueError(
            f"method.shared_adapter={shared_adapter!r}: expected a plain adapter name without "
            f"dots, not starting with {FROZEN_PREFIX!r}"
        )
    adapters = {v: shared_adapter or v for v in values}
    if preference_input:
        return _panacea(
            name, values, adapters, shared_adapter, margin_from, aggregation, ideal, lambda_init
        )
    if margin_from is None:
        return MethodInputs(name, adapters, dict(zip(values, w, strict=True)))
    return _modpo(name, values, adapters, w, Path(margin_from))


def _panacea(name, values, adapters, shared, margin_from, aggregation, ideal, lambda_init):
    from mva_lightning.model.panacea import AGGREGATIONS

    if shared is not None or margin_from is not None:
        raise ValueError("method.preference_input (Panacea) takes no shared_adapter or margin_from")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"method.aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if ideal is not None and len(ideal) != len(values):
        raise ValueError(f"method.ideal={list(ideal)}: expected {len(values)} entries ({values})")
    settings = {
        "aggregation": aggregation,
        "ideal": None if ideal is None else [float(z) for z in ideal],
        "lambda_init": float(lambda_init),
    }
    return MethodInputs(name, adapters, dict.fromkeys(values, 1.0), panacea=settings)


def _modpo(name: str, values: list[str], adapters, w: list[float], folder: Path) -> MethodInputs:
    if len(values) < 2:
        raise ValueError(f"method.margin_from (MODPO) needs at least two values, got {values}")
    if not w[0] > 0:
        raise ValueError(f"method.weights={w}: MODPO's trained value {values[0]!r} needs w_k > 0")
    frozen = {FROZEN_PREFIX + v: folder / v for v in values[1:]}
    missing = [str(p) for p in frozen.values() if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        raise ValueError(
            f"method.margin_from={folder}: no adapter_model.safetensors in {missing}; expected "
            "a finished run's adapters/ folder with one folder per value (e.g. a soup run)"
        )
    return MethodInputs(
        name=name,
        adapters=adapters,
        loss_weights={v: (1.0 if i == 0 else 0.0) for i, v in enumerate(values)},
        margin_weights={FROZEN_PREFIX + v: w[i] for i, v in enumerate(values) if i > 0},
        margin_own_weight=w[0],
        frozen=frozen,
    )


def load_frozen(policy: nn.Module, frozen: dict[str, Path]) -> None:
    """Load each frozen adapter's tensors (``<folder>/adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    from mva_lightning.model import lora

    for adapter, folder in frozen.items():
        try:
            lora.load_adapter_state_dict(
                policy, adapter, load_file(str(folder / "adapter_model.safetensors"))
            )
        except (RuntimeError, KeyError) as err:
            raise ValueError(
                f"method.margin_from: {folder} does not fit this model's LoRA ({err}); train it "
                "with the same model and model.lora settings"
            ) from None

"""mva_lightning: Multi-Value Alignment with Lightning, Hydra and PEFT.

Value vectors (one LoRA adapter per value) trained with DPO and decorrelated by a
mutual-information penalty, then extrapolated into a Pareto set of models.
"""

__version__ = "0.1.0"

__all__ = ["load_policy"]


def __getattr__(name: str):
    # Lazy: `import mva_lightning` stays light (no torch) until load_policy is used.
    if name == "load_policy":
        from mva_lightning.loading import load_policy

        return load_policy
    raise AttributeError(f"module 'mva_lightning' has no attribute {name!r}")

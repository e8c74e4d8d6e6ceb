"""mva_lightning: Multi-Value Alignment with Lightning, Hydra and PEFT.

Value vectors (one LoRA adapter per value) trained with DPO and decorrelated by a
mutual-information penalty, then extrapolated into a Pareto set of models.
"""

__version__ = "0.1.0"

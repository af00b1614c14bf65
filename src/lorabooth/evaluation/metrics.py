"""The DreamBooth paper's metrics as pure functions of embeddings.

Every function takes L2-normalisable embeddings (rows) and returns a float;
per-prompt figures are averaged, with their standard deviation, by
``summarise``.
"""

from __future__ import annotations

import math

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return _unit(a) @ _unit(b).T


def mean_pairwise(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs (a_i, b_j): DINO and CLIP-I, generated vs real."""
    return cosine_matrix(a, b).mean().item()


def mean_pairwise_within(x: torch.Tensor) -> float:
    """Mean cosine over pairs i != j of one set (leave-one-out: no self-pairs)."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    sims = cosine_matrix(x, x)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: mean cosine between each image and its own prompt (row i with row i)."""
    if images.shape[0] != texts.shape[0]:
        raise ValueError("one prompt embedding per image is needed")
    return (_unit(images) * _unit(texts)).sum(-1).mean().item()


def diversity(x: torch.Tensor) -> float:
    """DIV: 1 - mean pairwise similarity among images of one prompt (the paper
    uses LPIPS distance; this is the embedding-distance analogue)."""
    return 1.0 - mean_pairwise_within(x)


def summarise(values: list[float]) -> dict[str, float]:
    """Mean and (population) standard deviation over prompts, NaNs dropped."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
    return {"mean": mean, "std": std, "n": len(kept)}

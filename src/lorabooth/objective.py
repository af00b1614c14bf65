"""The DreamBooth objective as pure functions on tensors (no models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(noise: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity
    v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (Salimans & Ho, 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device)[timesteps].float()
        a = a.view(-1, *([1] * (latents.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                    prior_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Instance MSE plus ``prior_weight`` x class MSE.

    The batch holds instance examples first, then class examples (one forward
    pass for both, as in the paper's implementation). Returns (total, instance,
    prior); prior is None when the batch has no class examples.
    """
    pred, target = pred.float(), target.float()
    instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if pred.shape[0] == num_instance:
        return instance, instance, None
    prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    return instance + prior_weight * prior, instance, prior


def with_prior_target(target: torch.Tensor, num_instance: int,
                      frozen_pred: torch.Tensor) -> torch.Tensor:
    """Image-free prior preservation: the class rows' target is the frozen base
    model's own prediction for them under the class prompt (no gradient flows
    into it), the instance rows keep theirs. (B, ...) and (B - n, ...) -> (B, ...)."""
    return torch.cat([target[:num_instance], frozen_pred.detach().to(target.dtype)])

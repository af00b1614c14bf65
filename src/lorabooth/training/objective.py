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


def flow_target(noise: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Rectified flow's target, the velocity of x_t = (1 - sigma) x0 + sigma
    noise along sigma: noise - x0 (Liu et al., 2022; Esser et al., 2024)."""
    return noise - latents


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al., 2023): (B,).

    SNR(t) = a_t / (1 - a_t); epsilon prediction weighs min(SNR, gamma) / SNR,
    v-prediction min(SNR, gamma) / (SNR + 1), as diffusers' and kohya's
    scripts do. The nearly noise-free timesteps (large SNR) stop dominating.
    """
    a = alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (a zero-terminal-SNR schedule's last step)
        weights = torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    return weights.float()


def offset_noise(noise: torch.Tensor, offset: float, rng: torch.Generator) -> torch.Tensor:
    """Noise offset (Guttenberg, 2023): add ``offset`` x one N(0, 1) value per
    sample and channel, (B, C, 1, 1), so the model learns to shift an image's
    mean brightness. Offset 0 returns ``noise`` itself and draws nothing (the
    generator's stream, hence a seeded run, is unchanged)."""
    if not offset:
        return noise
    shift = torch.randn((*noise.shape[:2], *[1] * (noise.ndim - 2)), generator=rng)
    return noise + offset * shift.to(noise.device, noise.dtype)


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                    prior_weight: float, weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Instance MSE plus ``prior_weight`` x class MSE.

    The batch holds instance examples first, then class examples (one forward
    pass for both, as in the paper's implementation). Returns (total, instance,
    prior); prior is None when the batch has no class examples.

    ``weights`` (B,), e.g. min-SNR's, scale each row's MSE before each part's
    mean over its rows: mean(w_i * mse_i), as diffusers' and kohya's scripts
    do. Not normalised by the weights' sum, which would undo the weighting
    whenever a part holds one row (batch size 1).
    """
    pred, target = pred.float(), target.float()
    if weights is None:
        instance = F.mse_loss(pred[:num_instance], target[:num_instance])
        prior = F.mse_loss(pred[num_instance:], target[num_instance:]) \
            if pred.shape[0] > num_instance else None
    else:
        rows = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)  # (B,)
        rows = rows * weights.to(rows.device).float()
        instance = rows[:num_instance].mean()
        prior = rows[num_instance:].mean() if pred.shape[0] > num_instance else None
    if prior is None:
        return instance, instance, None
    return instance + prior_weight * prior, instance, prior


def with_prior_target(target: torch.Tensor, num_instance: int,
                      frozen_pred: torch.Tensor) -> torch.Tensor:
    """Image-free prior preservation: the class rows' target is the frozen base
    model's own prediction for them under the class prompt (no gradient flows
    into it), the instance rows keep theirs. (B, ...) and (B - n, ...) -> (B, ...)."""
    return torch.cat([target[:num_instance], frozen_pred.detach().to(target.dtype)])

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
                    prior_weight: float, weights: torch.Tensor | None = None,
                    pixel_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Instance MSE plus ``prior_weight`` x class MSE.

    The batch holds instance examples first, then class examples (one forward
    pass for both, as in the paper's implementation). Returns (total, instance,
    prior); prior is None when the batch has no class examples.

    ``weights`` (B,), e.g. min-SNR's, scale each row's MSE before each part's
    mean over its rows: mean(w_i * mse_i), as diffusers' and kohya's scripts
    do. Not normalised by the weights' sum, which would undo the weighting
    whenever a part holds one row (batch size 1). ``pixel_weights``
    (num_instance, 1, h, w), --masked-loss's, make each instance row's MSE
    a weighted mean over its pixels (``weighted_row_mse``).
    """
    pred, target = pred.float(), target.float()
    has_prior = pred.shape[0] > num_instance
    if weights is None and pixel_weights is None:
        instance = F.mse_loss(pred[:num_instance], target[:num_instance])
        prior = F.mse_loss(pred[num_instance:], target[num_instance:]) if has_prior else None
    else:
        rows = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)  # (B,)
        if pixel_weights is not None:
            rows = torch.cat([weighted_row_mse(pred[:num_instance], target[:num_instance],
                                               pixel_weights), rows[num_instance:]])
        if weights is not None:
            rows = rows * weights.to(rows.device).float()
        instance = rows[:num_instance].mean()
        prior = rows[num_instance:].mean() if has_prior else None
    if prior is None:
        return instance, instance, None
    return instance + prior_weight * prior, instance, prior


def mask_weights(masks: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """--masked-loss's per-pixel weights: 1 on the subject (mask 1),
    ``unmasked_weight`` elsewhere, blended on a soft edge. (N, 1, h, w)."""
    return masks + unmasked_weight * (1 - masks)


def on_grid(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weights`` (B, 1, h, w) averaged to ``like``'s grid (B, C, h', w'),
    e.g. FLUX's latents, which pack 2 x 2 cells into one channel group."""
    if weights.shape[-2:] != like.shape[-2:]:
        weights = F.adaptive_avg_pool2d(weights.float(), like.shape[-2:])
    return weights.to(like.device, torch.float32).expand_as(like)


def weighted_row_mse(pred: torch.Tensor, target: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """(B,) each row's weighted mean squared error: sum(w (p - t)^2) / sum(w)
    over its pixels and channels. All weights 1 give the plain MSE, so a small
    mask does not shrink the step; all weights 0 give 0."""
    w = on_grid(weights, pred)
    err = (pred.float() - target.float()).pow(2)
    return (w * err).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)


def masked_prior_loss(pred: torch.Tensor, frozen_pred: torch.Tensor,
                      masks: torch.Tensor) -> torch.Tensor:
    """OneTrainer's masked prior preservation: outside the subject's mask the
    LoRA's prediction is pulled to the frozen base's for the same noisy
    latents, the mean over rows of the MSE weighted by 1 - mask."""
    return weighted_row_mse(pred, frozen_pred.detach(), 1 - masks).mean()


def with_prior_target(target: torch.Tensor, num_instance: int,
                      frozen_pred: torch.Tensor) -> torch.Tensor:
    """Image-free prior preservation: the class rows' target is the frozen base
    model's own prediction for them under the class prompt (no gradient flows
    into it), the instance rows keep theirs. (B, ...) and (B - n, ...) -> (B, ...)."""
    return torch.cat([target[:num_instance], frozen_pred.detach().to(target.dtype)])

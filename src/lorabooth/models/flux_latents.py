"""FLUX's latents as the transformer reads them, pure functions on tensors:
the VAE's latents normalised (FLUX.1: shift and scale; FLUX.2: 2 x 2
patches, then the VAE's batch-norm statistics), packed into a sequence of
tokens, and the position ids that tell the transformer's rotary embedding
where each image and text token sits. The same arithmetic as diffusers'
FluxPipeline and Flux2KleinPipeline, so training and drawing agree.

Shapes: FLUX.1 runs on (B, 16, H/8, W/8) latents and packs 2 x 2 patches
into (B, H/16 * W/16, 64) tokens; FLUX.2 patchifies on normalising, runs on
(B, 128, H/16, W/16) and packs by flattening into (B, H/16 * W/16, 128).
"""

from __future__ import annotations

import torch


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2 x 2 patch into channels."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, H/2, W/2) -> (B, C, H, W): ``patchify``'s inverse."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def pack_patches(x: torch.Tensor) -> torch.Tensor:
    """FLUX.1: (B, C, H, W) -> (B, H/2 * W/2, 4C) tokens, one per 2 x 2 patch
    (channel-major within a token, as FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_patches(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.1: (B, H/2 * W/2, 4C) -> (B, C, H, W) for latents ``height`` x ``width``."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def pack_flat(x: torch.Tensor) -> torch.Tensor:
    """FLUX.2: (B, C, H, W) -> (B, H * W, C), row-major positions."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_flat(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.2: (B, H * W, C) -> (B, C, H, W)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def flux1_image_ids(height: int, width: int) -> torch.Tensor:
    """(H/2 * W/2, 3) ids (0, row, column) of FLUX.1's packed tokens for
    latents ``height`` x ``width``."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def flux1_text_ids(length: int) -> torch.Tensor:
    """(L, 3) zeros: FLUX.1's text tokens carry no position of their own."""
    return torch.zeros(length, 3)


def flux2_image_ids(height: int, width: int) -> torch.Tensor:
    """(H * W, 4) ids (time 0, row, column, layer 0) of FLUX.2's tokens."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=1)


def flux2_text_ids(length: int) -> torch.Tensor:
    """(L, 4) ids (0, 0, 0, position): FLUX.2's text tokens are numbered."""
    positions = torch.arange(length)
    zeros = torch.zeros_like(positions)
    return torch.stack([zeros, zeros, zeros, positions], dim=1)


def flux1_normalize(z: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """The VAE's latents -> the flow's: (z - shift) * scale."""
    return (z - shift) * scale


def flux1_denormalize(x: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    return x / scale + shift


def flux2_normalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2): patchified, then
    standardised by the VAE's batch-norm statistics (``mean``, ``std`` (4C,))."""
    x = patchify(z)
    return (x - mean.view(1, -1, 1, 1).to(x)) / std.view(1, -1, 1, 1).to(x)


def flux2_denormalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return unpatchify(x * std.view(1, -1, 1, 1).to(x) + mean.view(1, -1, 1, 1).to(x))

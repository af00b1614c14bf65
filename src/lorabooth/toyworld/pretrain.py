"""`lorabooth toyworld pretrain --out DIR`: the toy text-to-image model from
scratch on the CPU, with the same diffusers/transformers classes as Stable
Diffusion. Stage 1 trains the VAE, stage 2 the UNet and text encoder together
on cached latents, stage 3 the judges. Seeded; every figure logged."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .. import __version__
from ..core.errors import UserError
from ..core.fileio import to_json, write_json
from ..models.families import tokenize
from ..models.loading import BaseModel, clip_tokenizer, save_base, sd_noise_scheduler
from ..photos.images import chw_uint8, signed_unit
from .schedule import schedule
from .world import caption, random_spec, render, with_rare_word

log = logging.getLogger(__name__)
DROP = 0.3  # each of colour, pattern, context left out of a caption this often
EMPTY = 0.1  # captions left empty, for classifier-free guidance
# Token recovery: each word's final hidden state must name the word (logits
# against the input embeddings of the captions' vocabulary). Real CLIP's
# hidden states keep their tokens recoverable, so a rare identifier reaches the
# UNet as something distinct; trained on denoising alone, the toy text encoder
# squashes words that carry little meaning (docs/calibration.md).
RECOVERY_WEIGHT = 0.05


def toy_components() -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """Untrained toy parts: 32 px pictures, 8 x 8 x 4 latents."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=32, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )
    return vae, text_encoder, unet


def render_dataset(n: int, seed: int) -> tuple[torch.Tensor, list]:
    """n pictures (uint8, (n, 3, 32, 32)) and their specs; held-out combos excluded."""
    rng = random.Random(seed)
    specs = [random_spec(rng) for _ in range(n)]
    pixels = torch.stack([chw_uint8(render(s, seed * 1_000_003 + i)) for i, s in enumerate(specs)])
    return pixels, specs


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-10))).item()


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, batch: int,
              gen: torch.Generator, held: torch.Tensor) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = schedule(opt, steps, warmup=steps // 20)
    vae.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = signed_unit(pixels[torch.randint(0, len(pixels), (batch,), generator=gen)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.5f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    vae.eval()
    with torch.no_grad():
        x = signed_unit(held)
        quality = psnr(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
    return {"vae_steps": steps, "vae_seconds": round(time.perf_counter() - t0),
            "vae_psnr_db_held_out": round(quality, 2)}


@torch.no_grad()
def encode_all(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 512):
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(signed_unit(pixels[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def caption_vocabulary(tokenizer, specs, words: tuple[str, ...]) -> torch.Tensor:
    """Every token id a pretraining caption can hold (sorted): the template's
    words, the rare words, BOS and EOS."""
    rng = random.Random(0)
    texts = [caption(s, rng) for s in specs[:2000]] + list(words) + ["in the room"]
    ids = {i for t in texts for i in tokenizer(t).input_ids}
    return torch.tensor(sorted(ids))


def token_recovery_loss(states: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor,
                        vocabulary: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of naming each position's own token from its final
    hidden state (B, 77, D), scored against the input embeddings of
    ``vocabulary`` (V,); positions past the first EOS (padding) are ignored."""
    eos = ids.max()  # CLIP's EOS/pad id is the largest in the vocabulary
    first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)  # (B, 1)
    keep = torch.arange(ids.shape[1])[None, :] <= first_eos  # (B, 77)
    lookup = torch.full((int(embeddings.shape[0]),), -100, dtype=torch.long)
    lookup[vocabulary] = torch.arange(len(vocabulary))
    target = torch.where(keep, lookup[ids], torch.full_like(ids, -100))
    logits = states @ embeddings[vocabulary].T  # (B, 77, V)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def rare_words(tokenizer) -> tuple[str, ...]:
    """The identifier candidates `lorabooth identifier` offers, and 'sks', the
    one every DreamBooth tutorial uses."""
    from ..photos.identifier import candidates

    return tuple(sorted({c.token for c in candidates(tokenizer)} | {"sks"}))


def train_denoiser(unet, text_encoder, tokenizer, means, stds, specs, steps: int, batch: int,
                   gen: torch.Generator, rng: random.Random, scaling: float) -> dict:
    scheduler = sd_noise_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = schedule(opt, steps, warmup=steps // 30)
    unet.train(), text_encoder.train()
    t0, ema = time.perf_counter(), None
    words = rare_words(tokenizer)
    vocabulary = caption_vocabulary(tokenizer, specs, words)
    for step in range(steps):
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        prompts = ["" if rng.random() < EMPTY
                   else with_rare_word(caption(specs[i], rng, DROP), specs[i], words, rng)
                   for i in idx.tolist()]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        ids = tokenize(tokenizer, prompts)
        context = text_encoder(ids)[0]
        pred = unet(scheduler.add_noise(latents, noise, t), t, context).sample
        recovery = token_recovery_loss(context, ids, text_encoder.get_input_embeddings().weight,
                                       vocabulary)
        loss = F.mse_loss(pred, noise) + RECOVERY_WEIGHT * recovery
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("unet step %d/%d loss %.4f (ema %.4f, token recovery %.3f, %.0f s)", step + 1,
                     steps, loss.item(), ema, recovery.item(), time.perf_counter() - t0)
    unet.eval(), text_encoder.eval()
    return {"unet_steps": steps, "unet_seconds": round(time.perf_counter() - t0),
            "unet_final_loss_ema": round(ema, 4), "rare_words": len(words),
            "token_recovery_final": round(recovery.item(), 4)}


def _reused_vae(folder: Path) -> tuple[AutoencoderKL, dict]:
    """The VAE of an earlier pretraining, and its record's VAE figures."""
    import json

    if not (folder / "vae").is_dir() or not (folder / "toyworld.json").is_file():
        raise UserError(f"--reuse {folder}: not a toy model folder (needs vae/ and toyworld.json)")
    old = json.loads((folder / "toyworld.json").read_text())
    keep = {k: v for k, v in old.items() if k.startswith(("vae_", "judge_"))}
    keep["reused_from"] = {"vae_and_judges": str(folder), "command": old.get("command", "")}
    return AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32), keep


def _initial_denoiser(folder: Path) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    if not (folder / "unet").is_dir() or not (folder / "text_encoder").is_dir():
        raise UserError(f"--init {folder}: not a toy model folder (needs unet/ and text_encoder/)")
    return (CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32),
            UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))


def pretrain(out: str | Path, seed: int = 0, images: int = 40000, vae_steps: int = 3000,
             unet_steps: int = 3000, batch: int = 64, judge_steps: int = 1500,
             reuse: str | Path = "", init: str | Path = "",
             instance_steps: int = 1500, instance_renders: int = 6000) -> Path:
    """Everything, seeded: world renders -> VAE -> UNet + text encoder -> judges.
    ``reuse``: take the VAE and the judges from that earlier toy model (they
    do not depend on captions) and train only the UNet and text encoder.
    ``init``: start the UNet and text encoder from that toy model's weights
    (continued pretraining, e.g. on changed captions) instead of from scratch."""
    import shutil

    from .instance import train_instance_judge
    from .judges import ToyJudge, train_judges

    out = Path(out)
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    t0 = time.perf_counter()
    pixels, specs = render_dataset(images, seed)
    held, _ = render_dataset(256, seed + 1)
    log.info("rendered %d pictures in %.0f s", images, time.perf_counter() - t0)
    vae, text_encoder, unet = toy_components()
    record = {"command": " ".join(["lorabooth"] + sys.argv[1:]) if sys.argv else "",
              "seed": seed, "version": __version__, "images": images, "batch": batch}
    if reuse:
        vae, kept = _reused_vae(Path(reuse))
        record.update(kept)
    else:
        record.update(train_vae(vae, pixels, vae_steps, batch, gen, held))
    if init:
        text_encoder, unet = _initial_denoiser(Path(init))
        record["denoiser_init"] = str(init)
    vae.eval()
    means, stds = encode_all(vae, pixels)
    scaling = 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scaling)
    record["latent_scaling_factor"] = round(scaling, 5)
    record.update(train_denoiser(unet, text_encoder, clip_tokenizer(), means, stds, specs,
                                 unet_steps, batch, gen, rng, scaling))
    out.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)

    if reuse:
        shutil.copy(Path(reuse) / "judges.safetensors", out / "judges.safetensors")
    else:
        record.update(train_judges(out / "judges.safetensors", seed=seed, steps=judge_steps,
                                   blur=reconstruct))
    if reuse and (Path(reuse) / "instance.safetensors").is_file():
        shutil.copy(Path(reuse) / "instance.safetensors", out / "instance.safetensors")
    else:  # the instance judge reads the judges' frozen backbone (toyworld/instance.py)
        record.update(train_instance_judge(out / "instance.safetensors",
                                           ToyJudge.load(out / "judges.safetensors"),
                                           seed=seed, steps=instance_steps,
                                           renders=instance_renders, blur=reconstruct))
    # fp16 on disk halves the package; loading casts back to fp32
    base = BaseModel("toy", clip_tokenizer(), text_encoder.half(), vae.half(), unet.half(),
                     sd_noise_scheduler())
    save_base(base, out)
    record["total_seconds"] = round(time.perf_counter() - t0)
    write_json(out / "toyworld.json", record)
    log.info("toy model written to %s: %s", out, to_json(record))
    return out

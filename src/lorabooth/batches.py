"""What the training loop reads: the subject's images and prompts checked,
latents and prompt embeddings computed once before the loop (``Examples``),
and each step's batch of them (``sample_latents``, ``text_context``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .data import image_files, latent_distributions, prompt_embeddings, tokenize
from .errors import UserError
from .identifier import guess_identifier
from .imagefiles import problem
from .models import BaseModel

log = logging.getLogger(__name__)


@dataclass
class Examples:
    """Everything the loop reads per step, computed once before it."""

    instance_mean: torch.Tensor  # (N, 4, h, w) VAE posterior means
    instance_std: torch.Tensor
    class_mean: torch.Tensor | None  # (M, 4, h, w), None without prior preservation
    class_std: torch.Tensor | None
    instance_embedding: torch.Tensor | None  # (N, 77, D), one per image; text encoder frozen
    class_embedding: torch.Tensor | None  # (1, 77, D), frozen; the target's in --prior-preservation model
    instance_ids: torch.Tensor  # (N, 77) token ids, used when the text encoder trains
    class_ids: torch.Tensor | None
    scaling_factor: float  # the VAE's latent scale, kept so the VAE itself can be freed
    empty_embedding: torch.Tensor | None = None  # (1, 77, D) of "", for --caption-dropout
    empty_ids: torch.Tensor | None = None  # (1, 77)
    # --train-token with the text encoder frozen: it runs on the instance rows
    # every step (their identifier's embedding trains); None: cached above
    encoder: torch.nn.Module | None = None


def instance_images(config: TrainConfig) -> list[Path]:
    folder = Path(config.instance_dir)
    if not folder.is_dir():
        raise UserError(f"--instance-dir {folder}: no such folder")
    files = image_files(folder)
    problems = {path: problem(path) for path in files}
    if all(problems.values()):
        raise UserError(f"--instance-dir {folder}: no readable images (jpg, png, webp, bmp, tiff, gif)")
    bad = [path for path in files if problems[path]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"--instance-dir: {bad[0]}: {problems[bad[0]]}{more}; "
                        f"remove or replace it (`lorabooth prepare` sorts a folder out)")
    return files


def setup_examples(config: TrainConfig, base: BaseModel, resolution: int,
                    instance_paths: list[Path], captions: list[str],
                    class_paths: list[Path]) -> Examples:
    instance = latent_distributions(base.vae, instance_paths, resolution)
    klass = latent_distributions(base.vae, class_paths, resolution) if class_paths else (None, None)
    with_class = config.uses_prior
    prompts = sorted(set(captions)) + ([config.class_prompt] if with_class else [])
    row = [prompts.index(c) for c in captions]  # image i -> its prompt's row
    ids = tokenize(base.tokenizer, prompts)
    frozen = None
    if not config.train_text_encoder:
        frozen = prompt_embeddings(base.tokenizer, base.text_encoder, prompts)
    elif config.prior_model:  # the target's class prompt: the text encoder without LoRA (not yet added)
        frozen = prompt_embeddings(base.tokenizer, base.text_encoder, prompts[-1:])
    dropout = config.caption_dropout > 0
    return Examples(
        instance_mean=instance[0], instance_std=instance[1], class_mean=klass[0], class_std=klass[1],
        instance_embedding=None if frozen is None or config.train_text_encoder else frozen[row],
        class_embedding=None if frozen is None or not with_class else frozen[-1:],
        instance_ids=ids[row], class_ids=ids[-1:] if with_class else None,
        scaling_factor=float(base.vae.config.scaling_factor),
        empty_embedding=(prompt_embeddings(base.tokenizer, base.text_encoder, [""])
                         if dropout and not config.train_text_encoder else None),
        empty_ids=tokenize(base.tokenizer, [""]) if dropout else None,
    )


def instance_captions(config: TrainConfig, paths: list[Path]) -> list[str]:
    """Each image's prompt: IMAGE.txt beside it with --captions, else the
    instance prompt. A caption missing the identifier is named in a warning."""
    if not config.captions:
        return [config.instance_prompt] * len(paths)
    identifier = guess_identifier(config.instance_prompt, config.class_prompt)
    out = []
    for path in paths:
        txt = path.with_suffix(".txt")
        caption = read_caption(txt) if txt.is_file() else ""
        caption = caption or config.instance_prompt
        words = caption.lower().split()
        if identifier and not any(w in words for w in identifier):
            log.warning("%s: caption %r lacks the identifier %s", txt, caption, " ".join(identifier))
        out.append(caption)
    return out


def read_caption(txt: Path) -> str:
    try:
        return txt.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise UserError(f"--captions: {txt}: not UTF-8 text (byte {e.start}); "
                        f"save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"--captions: {txt}: cannot read ({e.strerror})") from None


def sample_latents(examples: Examples, idx: list[int], cidx: list[int],
                    rng: torch.Generator) -> torch.Tensor:
    mean, std = examples.instance_mean[idx], examples.instance_std[idx]
    if cidx:
        mean = torch.cat([mean, examples.class_mean[cidx]])
        std = torch.cat([std, examples.class_std[cidx]])
    latents = mean + std * torch.randn(mean.shape, generator=rng)
    return latents * examples.scaling_factor


def text_context(examples: Examples, modules: dict[str, torch.nn.Module], idx: list[int],
                  n_class: int, device: torch.device,
                  dropped: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder hidden states for the batch: (B, 77, D), instance rows first;
    the instance rows marked in ``dropped`` (len(idx),) get the empty prompt's."""
    if "text_encoder" in modules:
        ids = [examples.instance_ids[idx]]
        if dropped is not None and dropped.any():
            ids[0] = torch.where(dropped[:, None], examples.empty_ids, ids[0])
        if n_class:
            ids.append(examples.class_ids.expand(n_class, -1))
        return modules["text_encoder"](torch.cat(ids).to(device))[0]
    if examples.encoder is not None:  # --train-token: the identifier's rows change every step
        ids = examples.instance_ids[idx]
        if dropped is not None and dropped.any():
            ids = torch.where(dropped[:, None], examples.empty_ids, ids)
        parts = [examples.encoder(ids.to(device))[0]]
    else:
        parts = [examples.instance_embedding[idx].to(device)]
        if dropped is not None and dropped.any():
            parts[0] = torch.where(dropped[:, None, None].to(device),
                                   examples.empty_embedding.to(device), parts[0])
    if n_class:
        klass = (examples.class_embedding if examples.class_embedding is not None
                 else examples.encoder(examples.class_ids.to(device))[0])
        parts.append(klass.to(device).expand(n_class, -1, -1))
    return torch.cat(parts)

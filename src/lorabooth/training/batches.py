"""What the training loop reads: the subject's images and prompts checked,
latents, prompt embeddings and SDXL's time ids computed once before the loop
(``Examples``), and each step's batch of them (``sample_latents``,
``text_context``, ``batch_time_ids``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import TrainConfig
from ..config.templates import guess_identifier, without_identifier
from ..core.errors import UserError
from ..core.fileio import load_json, read_text_file
from ..models.families import FAMILIES, Conditioning, Family, encode_prompts, time_ids
from ..models.loading import BaseModel
from ..models.tokenwindow import check_prompt
from ..photos.buckets import Size
from ..photos.imagefiles import problem
from .data import image_files, latent_distributions
from .masks import check_masks, instance_masks

log = logging.getLogger(__name__)


@dataclass
class Examples:
    """Everything the loop reads per step, computed once before it."""

    # one (C, h, w) VAE posterior mean per image, at its bucket's size (--buckets; else
    # all at --resolution square), and the (width, height) in pixels it trains at
    instance_mean: list[torch.Tensor]
    instance_std: list[torch.Tensor]
    instance_bucket: list[Size]
    # per bucket the instance images use, every class image at that size:
    # bucket -> (M, C, h, w); None without class images
    class_mean: dict[Size, torch.Tensor] | None
    class_std: dict[Size, torch.Tensor] | None
    instance_embedding: Conditioning | None  # (N, 77, D), one per image; text encoders frozen
    # (1, 77, D) frozen, the class prompt (the target's in --prior-preservation model);
    # under dop one row per instance image: its caption without the identifier
    class_embedding: Conditioning | None
    instance_ids: torch.Tensor  # (N, E, 77) token ids, E text encoders; used when they train
    class_ids: torch.Tensor | None
    # the VAE's latents -> the denoiser's (SD: x scaling factor; FLUX: shift/patchify
    # and standardise), holding the VAE's constants so the VAE itself can be freed
    model_latents: Callable[[torch.Tensor], torch.Tensor]
    empty_embedding: Conditioning | None = None  # (1, 77, D) of "", for --caption-dropout
    empty_ids: torch.Tensor | None = None  # (1, E, 77)
    # --train-token with the text encoder frozen: it runs on the instance rows
    # every step (their identifier's embedding trains); None: cached above
    encoders: list[torch.nn.Module] | None = None
    family: Family = FAMILIES["sd1"]
    # the family's encoders without LoRA that still run each step beside trained
    # ones (FLUX.1's T5 while its CLIP trains), by diffusers' name
    frozen_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    # SDXL's micro-conditioning per image (N, 6), and bucket -> (M, 6) of the
    # class images; SD 1.x ignores them
    instance_time_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 6))
    class_time_ids: dict[Size, torch.Tensor] | None = None
    # --masked-loss: each photo's mask on its latents' grid, (1, h, w) per image
    instance_masks: list[torch.Tensor] | None = None


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
    if config.masked_loss:
        check_masks(files)
    log.info("--instance-dir %s: %d images", folder, len(files))
    return files


def setup_examples(config: TrainConfig, base: BaseModel, resolution: int,
                    instance_paths: list[Path], captions: list[str],
                    class_paths: list[Path], buckets: list[Size] | None = None) -> Examples:
    """The cached examples; instance image i at ``buckets[i]`` (width, height),
    by default all at the ``resolution`` square."""
    buckets = buckets or [(resolution, resolution)] * len(instance_paths)
    instance = bucketed_latents(base.vae, instance_paths, buckets)
    klass = class_latents(base.vae, class_paths, sorted(set(buckets)))
    with_class = config.uses_prior
    class_prompts = [config.class_prompt] if with_class else []
    if config.prior_same_noise:  # dop: each image's caption without the identifier
        words = guess_identifier(config.instance_prompt, config.class_prompt)
        class_prompts = [without_identifier(c, words) for c in captions]
    prompts = sorted(set(captions)) + class_prompts
    row = [prompts.index(c) for c in captions]  # image i -> its prompt's row
    n_class = len(class_prompts)
    ids = base.family.tokenize(base.tokenizers, prompts)

    def encode(some: list[str]) -> Conditioning:
        return encode_prompts(base.family, base.tokenizers, base.text_encoders, some)

    frozen = None
    if not config.train_text_encoder:
        frozen = encode(prompts)
    elif config.prior_model:  # the target's class prompt(s): the text encoders without LoRA (not yet added)
        frozen = encode(prompts[len(prompts) - n_class:])
    dropout = config.caption_dropout > 0
    boxes = prepared_boxes(Path(config.instance_dir))
    return Examples(
        instance_mean=instance[0], instance_std=instance[1], instance_bucket=list(buckets),
        class_mean=klass[0], class_std=klass[1],
        instance_embedding=None if frozen is None or config.train_text_encoder else frozen.rows(row),
        class_embedding=None if frozen is None or not with_class
        else frozen.rows(slice(len(frozen.hidden) - n_class, None)),
        instance_ids=ids[row], class_ids=ids[len(ids) - n_class:] if with_class else None,
        model_latents=base.family.model_latents(base.vae),
        empty_embedding=encode([""]) if dropout and not config.train_text_encoder else None,
        empty_ids=base.family.tokenize(base.tokenizers, [""]) if dropout else None,
        family=base.family,
        instance_time_ids=image_time_ids(instance_paths, buckets, boxes),
        class_time_ids={b: image_time_ids(class_paths, [b] * len(class_paths), {})
                        for b in klass[0]} if class_paths else None,
        instance_masks=instance_masks(instance_paths, buckets,
                                      [tuple(m.shape[-2:]) for m in instance[0]])
        if config.masked_loss else None,
    )


def bucketed_latents(vae, paths: list[Path], buckets: list[Size]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's VAE posterior (mean, std) at its bucket's size, the images
    of one bucket encoded together in their order (one bucket: as before)."""
    means: list = [None] * len(paths)
    stds: list = [None] * len(paths)
    for bucket in sorted(set(buckets)):
        members = [i for i, b in enumerate(buckets) if b == bucket]
        mean, std = latent_distributions(vae, [paths[i] for i in members], bucket)
        for i, m, s in zip(members, mean, std):
            means[i], stds[i] = m, s
    return means, stds


def class_latents(vae, paths: list[Path], buckets: list[Size]):
    """Every class image at every bucket the instance images use: bucket ->
    (M, C, h, w) means and stds, so a class row joins any batch in one
    forward ((None, None) without class images). The class images are square
    (drawn at --resolution): in another bucket they are centre-cropped to it."""
    if not paths:
        return None, None
    pairs = {b: latent_distributions(vae, paths, b) for b in buckets}
    return {b: p[0] for b, p in pairs.items()}, {b: p[1] for b, p in pairs.items()}


def prepared_boxes(folder: Path) -> dict[str, tuple[tuple[int, int], tuple]]:
    """Image name -> (original photo size, crop box) from the folder's
    prepare.json (written by `lorabooth prepare`); {} without one, or with
    one of another shape. One that cannot be read or parsed is one line."""
    if not (folder / "prepare.json").exists():
        return {}
    files = load_json(folder / "prepare.json")
    try:
        files = files["files"]
        return {f["output"]: (tuple(f["size"]), tuple(f["crop_box"])) for f in files
                if f.get("output") and f.get("size") and f.get("crop_box")}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def image_time_ids(paths: list[Path], targets: list[Size],
                   boxes: dict[str, tuple[tuple[int, int], tuple]]) -> torch.Tensor:
    """(N, 6) SDXL time ids of images trained at ``targets`` (width, height):
    the photo `prepare` cropped and its real crop box when known, else the
    image itself, centre-cropped to the target's aspect as the loader does."""
    from PIL import Image

    from ..photos.images import upright_rgb

    rows = []
    for path, target in zip(paths, targets):
        if path.name in boxes:
            size, box = boxes[path.name]
        else:
            with Image.open(path) as im:
                size = upright_rgb(im).size  # as the loader sees it, EXIF rotation applied
            box = (0, 0, *size)
        rows.append(time_ids(size, box, target))
    return torch.tensor(rows, dtype=torch.float32).reshape(len(paths), 6)


def instance_captions(config: TrainConfig, paths: list[Path]) -> list[str]:
    """Each image's prompt: IMAGE.txt beside it with --captions, else the
    instance prompt. A caption missing the identifier is named in a warning."""
    if not config.captions:
        return [config.instance_prompt] * len(paths)
    identifier = guess_identifier(config.instance_prompt, config.class_prompt)
    out = []
    for path in paths:
        txt = path.with_suffix(".txt")
        caption = read_caption(txt) if txt.exists() else ""
        caption = caption or config.instance_prompt
        words = caption.lower().split()
        if identifier and not any(w in words for w in identifier):
            log.warning("%s: caption %r lacks the identifier %s", txt, caption, " ".join(identifier))
        out.append(caption)
    return out


def check_prompt_windows(config: TrainConfig, tokenizers: list, paths: list[Path],
                         captions: list[str]) -> None:
    """Before any work: the instance and validation prompts must keep the
    identifier inside the text encoder's window (else it is never trained, or
    never drawn); a truncated class prompt or caption is named in a warning,
    and --train-token is refused when no training prompt keeps it."""
    words = guess_identifier(config.instance_prompt, config.class_prompt)
    check_prompt(tokenizers, config.instance_prompt, words, "--instance-prompt")
    if config.uses_prior:
        check_prompt(tokenizers, config.class_prompt, [], "--class-prompt")
    if config.validation_prompt:
        check_prompt(tokenizers, config.validation_prompt, words, "--validation-prompt")
    kept = not config.captions
    for path, caption in zip(paths, captions):
        txt = path.with_suffix(".txt")
        if not config.captions or caption == config.instance_prompt or not txt.is_file():
            kept = True  # the instance prompt, checked above
            continue
        f = check_prompt(tokenizers, caption, words, f"--captions: {txt}", refuse_cut=False)
        kept = kept or not f.cut
    if config.train_token and words and not kept:
        raise UserError(f"--train-token: every caption ({paths[0].with_suffix('.txt')}, ...) "
                        f"holds the identifier only past the text encoder's window: its "
                        f"embedding would never be trained")


def read_caption(txt: Path) -> str:
    return read_text_file(txt, "--captions").strip()


def sample_latents(examples: Examples, idx: list[int], cidx: list[int],
                    rng: torch.Generator) -> torch.Tensor:
    """(B, C, h, w) latents of the batch's rows, instance rows first, drawn from
    their cached posteriors; all of one bucket (the class rows at its size)."""
    mean = torch.stack([examples.instance_mean[i] for i in idx])
    std = torch.stack([examples.instance_std[i] for i in idx])
    if cidx:
        bucket = examples.instance_bucket[idx[0]]
        mean = torch.cat([mean, examples.class_mean[bucket][cidx]])
        std = torch.cat([std, examples.class_std[bucket][cidx]])
    latents = mean + std * torch.randn(mean.shape, generator=rng)
    return examples.model_latents(latents)


def text_context(examples: Examples, modules: dict[str, torch.nn.Module], idx: list[int],
                  n_class: int, device: torch.device,
                  dropped: torch.Tensor | None = None) -> Conditioning:
    """The text conditioning of the batch (hidden states (B, 77, D), SDXL's
    pooled embeddings), instance rows first; the instance rows marked in
    ``dropped`` (len(idx),) get the empty prompt's."""
    family = examples.family
    trained = [modules[name] if name in modules else examples.frozen_encoders.get(name)
               for name in family.encoders]
    trained = trained if any(name in modules for name in family.encoders) else []
    ids = examples.instance_ids[idx]
    if dropped is not None and dropped.any():
        ids = torch.where(dropped[:, None, None], examples.empty_ids, ids)
    if trained:  # the text encoders train: every row through them
        if n_class:
            ids = torch.cat([ids, class_rows(examples.class_ids, idx, n_class)])
        return family.encode(trained, ids.to(device))
    if examples.encoders is not None:  # --train-token: the identifier's rows change every step
        parts = [family.encode(examples.encoders, ids.to(device))]
    else:
        parts = [examples.instance_embedding.rows(idx).to(device)]
        if dropped is not None and dropped.any():
            parts[0] = parts[0].where(dropped, examples.empty_embedding)
    if n_class:
        parts.append(class_context(examples, idx, n_class, device))
    return Conditioning.cat(parts)


def class_rows(rows, idx: list[int], n: int):
    """The class conditioning of ``n`` prior rows, from one row for all (the
    class prompt: repeated) or one per instance image (dop: the batch's
    ``idx``, n == len(idx)). Works on token ids and on a Conditioning."""
    if isinstance(rows, Conditioning):
        return rows.expand(n) if len(rows.hidden) == 1 else rows.rows(idx)
    return rows.expand(n, *rows.shape[1:]) if len(rows) == 1 else rows[idx]


def class_context(examples: Examples, idx: list[int], n: int,
                  device: torch.device) -> Conditioning:
    """The frozen class conditioning of ``n`` prior rows (encoded now under
    --train-token, whose encoders have no cached rows)."""
    if examples.class_embedding is not None:
        return class_rows(examples.class_embedding, idx, n).to(device)
    ids = class_rows(examples.class_ids, idx, n)
    return examples.family.encode(examples.encoders, ids.to(device))


def batch_time_ids(examples: Examples, idx: list[int], cidx: list[int],
                   model_prior: bool = False) -> torch.Tensor:
    """(B, 6) time ids of the batch's rows: instance rows, then class images'
    (``cidx``) or, for --prior-preservation model, the instance rows again
    (its prior rows re-noise the instance latents)."""
    parts = [examples.instance_time_ids[idx]]
    if cidx:
        parts.append(examples.class_time_ids[examples.instance_bucket[idx[0]]][cidx])
    if model_prior:
        parts.append(parts[0])
    return torch.cat(parts)

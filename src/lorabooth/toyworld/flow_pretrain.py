"""`lorabooth toyworld flow-pretrain --out DIR`: the toy world's second base
model, FLUX.2 [klein]-shaped (issue 27 §5), so DreamBooth's claims can be
measured on a flow-matching transformer as on the UNet.

The same pictures, captions, rare words, VAE training and judges as
`toyworld pretrain` (imported from pretrain.py); the parts are FLUX.2
[klein]'s classes: AutoencoderKLFlux2 (its batch-norm statistics set from
the encoded pictures), a Qwen3ForCausalLM text encoder (28 layers, so the
pipeline's layers 9/18/27 exist) with a byte-level BPE tokenizer learnt
from the captions, and a Flux2Transformer2DModel.

Stages, seeded: render -> VAE -> text encoder as a causal language model on
the captions (an LLM encoder is trained on text alone, then frozen, as
FLUX.2's Qwen3 is) -> the transformer by flow matching through
training/noising.py and the flux2 family's ``predict``/``model_latents``
(the definitions LoRA training uses) -> judges -> a draw scored by them."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..core.errors import UserError
from ..core.fileio import to_json, write_json
from ..models.components import BaseModel
from ..models.families import FAMILIES
from ..models.flux_architecture import flow_scheduler
from ..models.flux_tokenizers import QWEN3_CHAT_TEMPLATE, qwen_tokenizer, train_byte_bpe
from ..models.loading import clip_tokenizer, pipeline_from_parts, save_base
from ..photos.images import signed_unit
from ..training.noising import Denoiser, noising_for
from .pretrain import DROP, EMPTY, encode_all, psnr, rare_words, render_dataset, train_vae
from .schedule import schedule
from .world import CLASSES, COLOURS, CONTEXTS, PATTERNS, caption, with_rare_word

log = logging.getLogger(__name__)
FAMILY = FAMILIES["flux2"]
RESOLUTION = 32
BPE_VOCAB = 2048  # a budget: training stops once every caption word is one token
QWEN_WIDTH = 32  # hidden size; the transformer reads 3 layers of it side by side
# The text window the toy model reads, in pretraining, LoRA training and
# drawing alike (its tokenizer's model_max_length, which the flux2 family
# reads through ``text_window``): the chat-templated captions are under 24
# tokens, and FLUX.2's 512 costs 11x more per step on the CPU, nearly all of
# it padding that a model must also learn to ignore.
TEXT_WINDOW = 32


def caption_words() -> tuple[str, ...]:
    """The words a pretraining caption is made of (besides the rare words)."""
    return ("a", "photo", "of", "on", "in", "the", *CLASSES, *COLOURS, *PATTERNS, *CONTEXTS)


def flow_tokenizer(words: tuple[str, ...], seed: int = 0):
    """Qwen's tokenizer class over a byte-level BPE learnt from the toy
    captions, so every caption word and every rare word is one token, with
    and without the space before it (any other text still tokenises, byte
    by byte). Raises if a word would split."""
    rng = random.Random(seed)
    from .world import random_spec

    specs = [random_spec(rng) for _ in range(4000)]
    texts = [with_rare_word(caption(s, rng, DROP), s, words, rng) for s in specs]
    vocabulary = caption_words() + words
    texts += [f"{w} {w}" for w in vocabulary] * 4  # each word alone, at a line's start too
    texts += ["user assistant"] * 4  # the chat template's role names
    tokenizer = qwen_tokenizer(train_byte_bpe(texts, BPE_VOCAB))
    split = [w for w in vocabulary for text in (w, " " + w)
             if len(tokenizer(text, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"the toy BPE splits {split[:5]}: raise BPE_VOCAB")
    assert tokenizer.chat_template == QWEN3_CHAT_TEMPLATE
    tokenizer.model_max_length = TEXT_WINDOW
    return tokenizer


def flow_components(vocab_size: int, seed: int):
    """Untrained FLUX.2 [klein]-shaped parts: 32 px pictures -> 16 x 16 x 4
    VAE latents -> 8 x 8 tokens of 16 channels; a Qwen3 32 wide, 28 layers;
    a transformer 128 wide with 2 double- and 4 single-stream blocks."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=32, sample_size=RESOLUTION)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=QWEN_WIDTH, intermediate_size=64,
        num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=3 * QWEN_WIDTH,
        timestep_guidance_channels=64, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
    return vae, text_encoder, transformer


def set_latent_statistics(vae, means: torch.Tensor, stds: torch.Tensor,
                          gen: torch.Generator) -> dict:
    """FLUX.2's latent normalisation: the VAE's batch-norm statistics are the
    per-channel mean and variance of its patchified latents (B, 4C, h, w),
    sampled from the posterior as training samples them."""
    from ..models.flux_latents import patchify

    x = patchify(means + stds * torch.randn(means.shape, generator=gen))
    vae.bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(x.var(dim=(0, 2, 3)) - vae.config.batch_norm_eps)
    return {"latent_std_mean": round(x.std(dim=(0, 2, 3)).mean().item(), 4)}


def _prompts(specs, idx: list[int], words, rng: random.Random) -> list[str]:
    return ["" if rng.random() < EMPTY
            else with_rare_word(caption(specs[i], rng, DROP), specs[i], words, rng) for i in idx]


def train_text_encoder(text_encoder, tokenizer, specs, words, steps: int, batch: int,
                       rng: random.Random) -> dict:
    """Next-token prediction on the chat-templated captions (padding unscored)."""
    opt = torch.optim.AdamW(text_encoder.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = schedule(opt, steps, warmup=steps // 20)
    text_encoder.train()
    t0, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(steps):
        prompts = _prompts(specs, [rng.randrange(len(specs)) for _ in range(batch)], words, rng)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                            labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log.info("text encoder step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    text_encoder.eval().requires_grad_(False)
    return {"text_steps": steps, "text_seconds": round(time.perf_counter() - t0),
            "text_final_loss": round(loss.item(), 4)}


def train_transformer(transformer, text_encoder, tokenizer, latents_of, means, stds, specs,
                      words, steps: int, batch: int, gen: torch.Generator,
                      rng: random.Random, text_lr: float = 0.0) -> dict:
    """Flow matching as `train` does it: the flux2 family's latents and
    prediction under the scheduler's forward process (logit-normal draws,
    shifted for the 8 x 8 token image). ``text_lr`` > 0: the text encoder
    trains beside the transformer at that rate, then is frozen.

    Why it may: FLUX.2's Qwen3 reaches the transformer with features that
    tell prompts apart. The toy's, 32 wide after a few hundred steps of
    language modelling, do not: two captions naming another class and
    place differ by 2% of their hidden states' norm, and a transformer
    trained on them draws the same picture for every prompt."""
    tokens = (means.shape[-2] // 2) * (means.shape[-1] // 2)
    denoiser = Denoiser(transformer, FAMILY, noising_for(flow_scheduler(), "logit_normal", tokens))
    groups = [{"params": list(transformer.parameters()), "lr": 1e-3}]
    if text_lr:
        text_encoder.train().requires_grad_(True)
        groups.append({"params": list(text_encoder.parameters()), "lr": text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = schedule(opt, steps, warmup=steps // 30)
    transformer.train()
    t0, ema = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        latents = latents_of(means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen))
        ids = FAMILY.tokenize([tokenizer], _prompts(specs, idx.tolist(), words, rng))
        with torch.set_grad_enabled(bool(text_lr)):
            context = FAMILY.encode([text_encoder], ids)
        noise = torch.randn(latents.shape, generator=gen)
        t = denoiser.noising.draw(batch, gen)
        pred = denoiser(denoiser.noising.noisy(latents, noise, t), t, context)
        loss = F.mse_loss(pred, denoiser.noising.target(latents, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log.info("transformer step %d/%d loss %.4f (ema %.4f, %.0f s)", step + 1, steps,
                     loss.item(), ema, time.perf_counter() - t0)
    transformer.eval()
    text_encoder.eval().requires_grad_(False)
    seconds = time.perf_counter() - t0
    return {"transformer_steps": steps, "text_window": int(tokenizer.model_max_length),
            "text_lr_beside_transformer": text_lr,
            "transformer_seconds": round(seconds),
            "seconds_per_step": round(seconds / max(steps, 1), 3),
            "transformer_final_loss_ema": None if ema is None else round(ema, 4)}


def class_accuracy(base: BaseModel, judge, per_prompt: int = 8, steps: int = 20,
                   guidance: float = 4.0) -> dict:
    """Draw "a photo of a {class} on/in the {context}" (class i with context
    i), ``per_prompt`` seeds each, and score the draws with the judge: the
    fraction whose class and whose context it reads as the prompt's."""
    pipe = pipeline_from_parts(base)
    pipe.set_progress_bar_config(disable=True)
    hits = {"cls": 0, "context": 0}
    n = 0
    for i, (cls, ctx) in enumerate(zip(CLASSES, CONTEXTS)):
        prompt = f"a photo of a {cls} {'in the' if ctx == 'room' else 'on the'} {ctx}"
        with torch.inference_mode():
            images = pipe(prompt=[prompt] * per_prompt, **base.family.draw_options(pipe),
                          num_inference_steps=steps,
                          guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION,
                          generator=[torch.Generator().manual_seed(i * per_prompt + k)
                                     for k in range(per_prompt)]).images
        for p in judge.predict(images):
            hits["cls"] += p["cls"] == cls
            hits["context"] += p["context"] == ctx
        n += per_prompt
    return {f"draws_{k}_accuracy": round(v / n, 4) for k, v in hits.items()} | {"draws": n}


def _judges(out: Path, judges_from: str, seed: int, judge_steps: int, instance_steps: int,
            instance_renders: int, reconstruct) -> dict:
    """The judges: trained here on this VAE's reconstructions, or copied
    from an earlier toy model folder (they read pixels, not the model)."""
    import shutil

    from .instance import train_instance_judge
    from .judges import ToyJudge, train_judges

    if judges_from:
        src = Path(judges_from)
        if not (src / "judges.safetensors").is_file():
            raise UserError(f"--judges-from {src}: no judges.safetensors there")
        for name in ("judges.safetensors", "instance.safetensors"):
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
        return {"judges_from": str(src)}
    record = train_judges(out / "judges.safetensors", seed=seed, steps=judge_steps,
                          blur=reconstruct)
    record.update(train_instance_judge(out / "instance.safetensors",
                                       ToyJudge.load(out / "judges.safetensors"), seed=seed,
                                       steps=instance_steps, renders=instance_renders,
                                       blur=reconstruct))
    return record


def _earlier(init: str):
    """An earlier flow toy model's tokenizer, VAE, text encoder and
    transformer in fp32 (``--init``: its transformer trains on), and its record."""
    import json

    from ..models.loading import load_base

    folder = Path(init)
    if not (folder / "transformer").is_dir() or not (folder / "toyworld.json").is_file():
        raise UserError(f"--init {folder}: not a flow toy model folder (no transformer/ and "
                        f"toyworld.json there)")
    base = load_base(str(folder))
    if base.family.name != FAMILY.name:
        raise UserError(f"--init {folder}: a {base.family.name} model, not {FAMILY.name}")
    base.tokenizer.model_max_length = TEXT_WINDOW
    parts = (base.tokenizer, base.vae.float(), base.text_encoder.float().requires_grad_(False),
             base.unet.float())
    return parts, json.loads((folder / "toyworld.json").read_text())


def _parts(init: str, earlier_parts, pixels, held, specs, words, seed: int, vae_steps: int,
           vae_batch: int, text_steps: int, gen: torch.Generator, rng: random.Random):
    """The tokenizer, VAE, text encoder and transformer, the VAE's latents
    of ``pixels`` (means, stds) and what training them recorded: new ones
    trained here, or an earlier model's (``earlier_parts``: ``_earlier(init)``)."""
    if init:
        (tokenizer, vae, text_encoder, transformer), earlier = earlier_parts
        means, stds = encode_all(vae, pixels)
        return (tokenizer, vae, text_encoder, transformer, means, stds,
                {"init": {"folder": str(init), "command": earlier.get("command"),
                          "transformer_steps": earlier.get("transformer_steps"),
                          "text_lr_beside_transformer": earlier.get("text_lr_beside_transformer"),
                          "draws_cls_accuracy": earlier.get("draws_cls_accuracy"),
                          "draws_context_accuracy": earlier.get("draws_context_accuracy"),
                          "init": earlier.get("init")}})  # the whole chain of starts
    tokenizer = flow_tokenizer(words, seed)
    vae, text_encoder, transformer = flow_components(len(tokenizer), seed)
    record = train_vae(vae, pixels, vae_steps, vae_batch, gen, held)
    means, stds = encode_all(vae, pixels)
    record.update(set_latent_statistics(vae, means, stds, gen))
    record.update(train_text_encoder(text_encoder, tokenizer, specs, words, text_steps, 64, rng))
    return tokenizer, vae, text_encoder, transformer, means, stds, record


def flow_pretrain(out: str | Path, seed: int = 0, images: int = 16000, vae_steps: int = 1000,
                  text_steps: int = 300, steps: int = 1500, batch: int = 32, vae_batch: int = 32,
                  judge_steps: int = 1500, instance_steps: int = 1500,
                  instance_renders: int = 6000, judges_from: str = "", init: str = "",
                  text_lr: float = 3e-4,
                  eval_per_prompt: int = 8, eval_steps: int = 20) -> Path:
    """Everything, seeded; the record (toyworld.json) holds every figure,
    the VAE's PSNR on held-out renders and the judges' reading of draws.
    ``init``: an earlier flow toy model whose parts to start from (its VAE
    and text encoder kept, its transformer trained ``steps`` more), and
    whose judges to copy unless ``judges_from`` says otherwise."""
    from .judges import ToyJudge

    out = Path(out)
    judges_from = judges_from or init
    if judges_from and not (Path(judges_from) / "judges.safetensors").is_file():
        option = "--judges-from" if judges_from != init else "--init"
        raise UserError(f"{option} {judges_from}: no judges.safetensors there")  # before any work
    earlier = _earlier(init) if init else None  # refused before the rendering, not after
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    t0 = time.perf_counter()
    pixels, specs = render_dataset(images, seed)
    held, _ = render_dataset(256, seed + 1)
    words = rare_words(clip_tokenizer())  # the UNet world's rare words
    tokenizer, vae, text_encoder, transformer, means, stds, trained = _parts(
        init, earlier, pixels, held, specs, words, seed, vae_steps, vae_batch, text_steps, gen,
        rng)
    record = {"command": " ".join(["lorabooth"] + sys.argv[1:]) if sys.argv else "",
              "family": FAMILY.name, "seed": seed, "version": __version__, "images": images,
              "batch": batch, "vocabulary": len(tokenizer), **trained}
    record.update(train_transformer(transformer, text_encoder, tokenizer, FAMILY.model_latents(vae),
                                    means, stds, specs, words, steps, batch, gen, rng,
                                    text_lr))
    out.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)

    record.update(_judges(out, judges_from, seed, judge_steps, instance_steps, instance_renders,
                          reconstruct))
    base = BaseModel("flow-toy", tokenizer, text_encoder, vae, transformer, flow_scheduler(),
                     FAMILY, resolution=RESOLUTION)
    record.update(class_accuracy(base, ToyJudge.load(out / "judges.safetensors"),
                                 per_prompt=eval_per_prompt, steps=eval_steps))
    with torch.no_grad():
        record["vae_psnr_db_held_out_final"] = round(psnr(reconstruct(
            signed_unit(held)), signed_unit(held)), 2)
    # fp16 on disk halves the package; loading casts back to fp32
    save_base(BaseModel("flow-toy", tokenizer, text_encoder.half(), vae.half(),
                        transformer.half(), flow_scheduler(), FAMILY), out)
    record["total_seconds"] = round(time.perf_counter() - t0)
    write_json(out / "toyworld.json", record)
    log.info("flow toy model written to %s: %s", out, to_json(record))
    return out

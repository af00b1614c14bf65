"""The building blocks of a base model that need no files: the container
training works on (BaseModel), CLIP's tokenizer rebuilt offline from the BPE
vocabulary that ships with the package, and SD's training noise schedule.
`models` (SD 1.x) and `sdxl` both build on them."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .families import FAMILIES, Family

CLIP_VOCAB_SIZE = 49408


@dataclass
class BaseModel:
    """The parts of a diffusion model that training needs; ``family`` says
    which text encoders it has (SDXL: a second one; FLUX.1: CLIP-L, then
    T5). ``unet`` is the denoiser: a UNet, or the FLUX families' transformer
    (diffusers' ``transformer``), with a flow-matching ``noise_scheduler``."""

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    family: Family = FAMILIES["sd1"]
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: torch.nn.Module | None = None  # CLIPTextModelWithProjection; FLUX.1's T5
    resolution: int = 0  # a transformer's native size in pixels (0: the family's)

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer, self.tokenizer_2][:len(self.family.encoders)]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The family's text encoders in order (None where freed)."""
        return [getattr(self, name) for name in self.family.encoders]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        size = getattr(self.unet.config, "sample_size", None)  # a transformer has none
        if size is None:
            return self.resolution or self.family.resolution
        return int(size) * self.vae_scale_factor


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: every byte gets a printable unicode stand-in,
    # so merges never see whitespace or control characters.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    path = resources.files("lorabooth") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # The file's first line is a header; CLIP keeps 49152 - 256 - 2 merges so that
    # 256 bytes x 2 (with/without </w>) + merges + 2 specials = 49408 tokens.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (49,408 tokens), built offline from the BPE file
    that ships with open_clip (MIT licence; see assets/LICENSE-open_clip.txt)."""
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges],
                         model_max_length=77)


def sd_noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon",
        clip_sample=False, steps_offset=1,
    )

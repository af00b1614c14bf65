"""FLUX.2 [klein] and FLUX.1 offline: the published architectures' configs,
the built-in `tiny-flux2` and `tiny-flux` (small random weights, seconds per
step) and `flux2-klein-random` and `flux-random` (the exact architectures,
random weights, for memory and speed), and diffusers folders of either
family, told apart by model_index.json's pipeline class.

The configs are those of black-forest-labs/FLUX.2-klein-4B (a 3.9 B
transformer over Qwen3-4B's layers 9/18/27, 3 x 2560 = 7680 wide, 32 latent
channels patchified to 128) and black-forest-labs/FLUX.1-dev (a 11.9 B
transformer over T5-XXL (4096) and CLIP-L's pooled output (768), 16 latent
channels packed to 64, with a guidance embedding)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.fileio import load_json
from .families import FAMILIES

FLUX2_KLEIN_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}
FLUX2_VAE: dict = {}  # AutoencoderKLFlux2's defaults are the published VAE (32 channels)
QWEN3_4B = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645}
FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX1_VAE = {
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 16, "layers_per_block": 2,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
          "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
          "eos_token_id": 49407, "pad_token_id": 1}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
          "num_heads": 64, "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
          "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1,
          "decoder_start_token_id": 0, "tie_word_embeddings": False}
# Both families' scheduler (FLUX.1-dev's and FLUX.2-klein's scheduler_config.json):
# the sigmas shifted by the image's token count (mu from 256 to 4096 tokens).
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}

# model_index.json's _class_name -> family; any other FLUX pipeline is refused
FLUX_PIPELINES = {"Flux2KleinPipeline": "flux2", "FluxPipeline": "flux1"}
BUILTIN_FLUX = {"tiny-flux2": "flux2", "tiny-flux": "flux1",
                "flux2-klein-random": "flux2", "flux-random": "flux1"}


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)


@contextlib.contextmanager
def _building(seed: int, dtype: torch.dtype, device: str):
    """Modules built inside have ``dtype`` weights on ``device`` straight away
    (no fp32 copy of a 12 B model first), from torch's generator at ``seed``."""
    old = torch.get_default_dtype()
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _eval(base):
    """Inference mode, as from_pretrained leaves a model (T5 has dropout)."""
    for module in (base.unet, base.vae, *base.text_encoders):
        module.eval()
    return base


def build_tiny_flux2(seed: int = 0):
    """FLUX.2 [klein]'s classes with small random weights, built in about a
    second: a Qwen3 of 28 layers 32 wide (so the pipeline's layers 9, 18 and
    27 exist), a transformer of 2 double and 2 single blocks, a two-level
    VAE with 4 latent channels (16 after patchifying) whose batch-norm
    statistics are not the identity, 32 px images."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .components import BaseModel
    from .flux_tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    with _building(seed, torch.float32, "cpu"):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=True))
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * 32,
            timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(
            block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
            norm_num_groups=8, sample_size=32)
        vae.bn.running_mean.copy_(0.1 * torch.randn(16))
        vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return _eval(BaseModel("tiny-flux2", tokenizer, text_encoder, vae, transformer,
                           flow_scheduler(), FAMILIES["flux2"], resolution=32))


def build_tiny_flux(seed: int = 0):
    """FLUX.1's classes with small random weights, built in about a second:
    CLIP (32 wide, CLIP's own tokenizer) and T5 (48 wide, a small Unigram
    tokenizer), so a swapped encoder fails loudly; a transformer of 2 double
    and 2 single blocks with [dev]'s guidance embedding; a two-level VAE
    with 16 latent channels and FLUX.1's shift and scale; 32 px images."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .components import BaseModel, clip_tokenizer
    from .flux_tokenizers import t5_tokenizer

    t5_tok = t5_tokenizer()
    with _building(seed, torch.float32, "cpu"):
        clip = CLIPTextModel(CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(**{
            **FLUX1_VAE, "block_out_channels": (32, 64), "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "sample_size": 32})
    return _eval(BaseModel("tiny-flux", clip_tokenizer(), clip, vae, transformer,
                           flow_scheduler(), FAMILIES["flux1"], t5_tok, t5, resolution=32))


def build_flux2_klein_random(seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                             device: str = "cpu"):
    """FLUX.2 [klein] 4B's exact architecture with random weights (3.9 B
    transformer + 4.0 B Qwen3: 16 GB in bf16), built on ``device`` ("meta":
    shapes only). The tokenizer is the tiny one (its ids are valid Qwen ids)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .components import BaseModel
    from .flux_tokenizers import qwen_tokenizer

    with _building(seed, dtype, device):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
        transformer = Flux2Transformer2DModel(**FLUX2_KLEIN_TRANSFORMER)
        vae = AutoencoderKLFlux2(**FLUX2_VAE)
    return _eval(BaseModel("flux2-klein-random", qwen_tokenizer(), text_encoder, vae,
                           transformer, flow_scheduler(), FAMILIES["flux2"]))


def build_flux_random(seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """FLUX.1 [dev]'s exact architecture with random weights (11.9 B
    transformer + 4.8 B T5-XXL + CLIP-L: 33 GB in bf16, more than a 24 GB
    machine holds: build it on a GPU, or on "meta" for shapes only). T5's
    tokenizer is the tiny one (its ids are valid T5 ids)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .components import BaseModel, clip_tokenizer
    from .flux_tokenizers import t5_tokenizer

    with _building(seed, dtype, device):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX1_VAE)
    return _eval(BaseModel("flux-random", clip_tokenizer(), clip, vae, transformer,
                           flow_scheduler(), FAMILIES["flux1"], t5_tokenizer(), t5))


def build_builtin_flux(name: str):
    """One of BUILTIN_FLUX by name (the random ones in bf16, on a GPU when
    there is one)."""
    if name == "tiny-flux2":
        return build_tiny_flux2()
    if name == "tiny-flux":
        return build_tiny_flux()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build = build_flux2_klein_random if name == "flux2-klein-random" else build_flux_random
    return build(device=device)


def flux_folder_family(path: Path) -> str | None:
    """"flux2" or "flux1" for a diffusers folder of FLUX.2 [klein] or FLUX.1,
    by model_index.json's pipeline class; None for any other folder; a FLUX
    pipeline lorabooth does not train (FLUX.2 [dev], Fill, ...) is one line."""
    try:
        name = str(load_json(path / "model_index.json").get("_class_name", ""))
    except (UserError, AttributeError):
        return None
    if name in FLUX_PIPELINES:
        return FLUX_PIPELINES[name]
    if name.startswith("Flux"):
        raise UserError(f"--model {path}: a {name} folder; lorabooth trains "
                        f"{' and '.join(FLUX_PIPELINES)} models")
    return None


def _parts(family: str) -> tuple[str, ...]:
    second = ("text_encoder_2", "tokenizer_2") if family == "flux1" else ()
    return ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") + second


def check_flux_folder(path: Path, name: str, family: str,
                      parts: tuple[str, ...] | None = None) -> None:
    """One line naming every part missing from a FLUX diffusers folder."""
    missing = [p for p in (parts or _parts(family)) if not (path / p).is_dir()]
    if missing:
        title = "FLUX.2 [klein]" if family == "flux2" else "FLUX.1"
        raise UserError(f"--model {name}: not a {title} diffusers folder, missing "
                        f"{', '.join(p + '/' for p in missing)} in {path}")


def _text_encoder(path: Path, sub: str, dtype: torch.dtype):
    """The class model_index.json names for ``sub`` (within the known ones)."""
    import transformers

    allowed = ("Qwen3ForCausalLM", "Qwen3Model", "CLIPTextModel", "T5EncoderModel")
    entry = load_json(path / "model_index.json").get(sub) or [None, None]
    cls_name = entry[1] if entry[1] in allowed else allowed[2 if sub == "text_encoder" else 3]
    return getattr(transformers, cls_name).from_pretrained(path, subfolder=sub, dtype=dtype)


def load_flux_folder(path: Path, name: str, family: str, dtype: torch.dtype = torch.float32,
                     transformer=None, precision: str = "auto"):
    """A FLUX diffusers folder as a BaseModel: the transformer and the text
    encoders (as large as it: Qwen3-4B, T5-XXL) in ``dtype``, the VAE fp32.
    ``transformer``: use this one (a single file's) instead of transformer/.
    ``precision`` (--base-precision): the transformer's Linears quantised as
    they are streamed in."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
    )

    from .components import BaseModel
    from .lowmem import load_streamed

    check_flux_folder(path, name, family, tuple(
        p for p in _parts(family) if transformer is None or p != "transformer"))
    if transformer is None:
        cls = Flux2Transformer2DModel if family == "flux2" else FluxTransformer2DModel
        transformer = (load_streamed(cls, path / "transformer", dtype, path, precision)
                       if dtype != torch.float32 or precision != "auto" else None)
        transformer = transformer or cls.from_pretrained(path, subfolder="transformer",
                                                         torch_dtype=dtype)
    vae_cls = AutoencoderKLFlux2 if family == "flux2" else AutoencoderKL
    second = {}
    if family == "flux1":
        second = {"tokenizer_2": flux_tokenizer(path, "tokenizer_2", family),
                  "text_encoder_2": _text_encoder(path, "text_encoder_2", dtype)}
    return BaseModel(
        name=name, tokenizer=flux_tokenizer(path, "tokenizer", family),
        text_encoder=_text_encoder(path, "text_encoder", dtype),
        vae=vae_cls.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32),
        unet=transformer,
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        family=FAMILIES[family], **second)


def flux_tokenizer(path: Path, subfolder: str, family: str):
    """A FLUX folder's tokenizer, its ``model_max_length`` no longer than
    the window the pipeline reads (Qwen3's tokenizer says 131072; FLUX.2
    reads 512 tokens of the templated prompt), so the prompt checks
    (tokenwindow.py) count against the window that is read."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder)
    tokenizer.model_max_length = min(int(tokenizer.model_max_length),
                                     FAMILIES[family].max_length)
    return tokenizer

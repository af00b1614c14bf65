"""Load a base model: a diffusers folder, a hub id, a single file, or a
built-in (`tiny`, `tiny-sdxl`, `tiny-flux2`, `tiny-flux`, the random full
architectures). FLUX folders and files go through flux_architecture.py and
flux_singlefile.py.

Real models load through diffusers/transformers ``from_pretrained``; nothing
here waits on the network for long: a hub id that is not in the local cache
fails within seconds with one line saying how to get it.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..core.errors import UserError
from ..formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from .components import (  # noqa: F401  (re-exported: the rest of the package imports them from here)
    CLIP_VOCAB_SIZE,
    BaseModel,
    clip_tokenizer,
    sd_noise_scheduler,
)
from .families import FAMILIES, Family
from .flux_architecture import BUILTIN_FLUX
from .lowmem import load_unet

BUILTIN_MODELS = ("tiny", "toy", "sd15-random", "tiny-sdxl", "sdxl-random", "tiny-flux2",
                  "tiny-flux", "flux2-klein-random", "flux-random", "flow-toy")
FLOW_TOY_RESOLUTION = 32


def toy_model_dir() -> Path:
    """The shipped toy-world model (`lorabooth toyworld pretrain` remakes it)."""
    return Path(str(resources.files("lorabooth") / "assets" / "toy"))


def flow_toy_model_dir() -> Path:
    """The shipped flow-matching toy model (`lorabooth toyworld flow-pretrain` remakes it)."""
    return Path(str(resources.files("lorabooth") / "assets" / "flow_toy"))


def _load_flow_toy(unet_dtype: torch.dtype, precision: str = "auto") -> BaseModel:
    """The flow toy model: a FLUX.2 [klein] folder drawn at 32 px."""
    import dataclasses

    from .flux_architecture import load_flux_folder

    if not (flow_toy_model_dir() / "transformer").is_dir():
        raise UserError("--model flow-toy: the flow toy model is not in this installation; make "
                        "it with `lorabooth toyworld flow-pretrain --out DIR` and pass DIR")
    base = load_flux_folder(flow_toy_model_dir(), "flow-toy", "flux2", unet_dtype,
                            precision=precision)
    return dataclasses.replace(base, resolution=FLOW_TOY_RESOLUTION)

def build_tiny(seed: int = 0) -> BaseModel:
    """An SD-1.5-shaped model with small random weights, built from configs in
    about a second. Same classes and code paths as the real model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _build_tiny()


def _build_tiny() -> BaseModel:
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64),
        # Attention only at the 16 x 16 level, as in diffusers' own test model:
        # self-attention over 32 x 32 tokens would cost 16x more per step.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=64, norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    return BaseModel("tiny", clip_tokenizer(), text_encoder, vae, unet, sd_noise_scheduler())


def build_sd15_random(seed: int = 0) -> BaseModel:
    """Stable Diffusion 1.5's exact architecture (860 M-parameter UNet) with
    random weights: the real compute and memory, for benchmarks, offline."""
    import json
    import tempfile


    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        torch.manual_seed(seed)
        folder = sd15_config_dir(Path(tmp))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te_config = json.loads((folder / "text_encoder" / "config.json").read_text())
        te_config.pop("architectures")
        te_config.pop("model_type")
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    return BaseModel("sd15-random", clip_tokenizer(), text_encoder, vae, unet, sd_noise_scheduler())


def _load_folder(path: Path, name: str, unet_dtype: torch.dtype = torch.float32,
                 tokenizer: CLIPTokenizer | None = None, precision: str = "auto") -> BaseModel:
    """``tokenizer``: use this one instead of the folder's tokenizer/;
    ``precision``: --base-precision, applied to the denoiser as it streams in."""
    from .flux_architecture import flux_folder_family, load_flux_folder
    from .sdxl_architecture import folder_family

    flux = flux_folder_family(path)
    if flux:
        return load_flux_folder(path, name, flux, unet_dtype, precision=precision)
    family = FAMILIES[folder_family(path)]
    second = ("text_encoder_2", "tokenizer_2") if family.name == "sdxl" else ()
    needed = ("unet", "vae", "text_encoder", "scheduler") + (() if tokenizer else ("tokenizer",))
    needed += second
    missing = [p for p in needed if not (path / p).is_dir()]
    if missing:
        raise UserError(f"--model {name}: not a diffusers model folder, missing "
                        f"{', '.join(missing)}/ in {path}")
    return BaseModel(
        name=name,
        # fp32 whatever the files hold (the toy model and many checkpoints are
        # stored fp16); the UNet in ``unet_dtype`` when training keeps its
        # frozen weights in bf16/fp16 (read and converted one tensor at a
        # time: no fp32 copy resident, see lowmem.py)
        tokenizer=tokenizer or CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                   dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32),
        unet=load_unet(path / "unet", unet_dtype, path, precision),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        family=family, **_second_encoder(path, second),
    )


def _second_encoder(path: Path, parts: tuple[str, ...]) -> dict:
    """SDXL's second tokenizer and text encoder from a diffusers folder, fp32."""
    if not parts:
        return {}
    from transformers import CLIPTextModelWithProjection

    return {"tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", dtype=torch.float32)}


def resolve_hub(model_id: str) -> Path:
    """A hub id -> its local snapshot folder, downloading only when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.txt", "*.safetensors"]
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    how = f"download it where the network is open (`hf download {model_id}`) or pass a local folder"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"--model {model_id}: not in the local Hugging Face cache and "
                        f"HF_HUB_OFFLINE is set; {how}")
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as e:  # network errors come in many classes; all mean the same here
        raise UserError(f"--model {model_id}: not found locally and could not be downloaded "
                        f"({type(e).__name__}); {how}") from None


def _load_single(path: Path, name: str, config: str) -> BaseModel:
    """A single file; its architecture from ``config`` (a diffusers folder)
    if given, else from its keys, with SD 1.5's or SDXL's offline configs."""
    import shutil
    import tempfile

    from ..formats.singlefile import load_single_file
    from .flux_singlefile import bfl_family, load_bfl_transformer
    from .sdxl_architecture import file_family, folder_family, sdxl_config_dir, single_file_keys

    flux = bfl_family(single_file_keys(path))
    if flux:
        return _load_flux_single(path, name, config, flux, load_bfl_transformer)
    family = folder_family(Path(config)) if config else file_family(path)
    scratch = None
    if not config:
        scratch = Path(tempfile.mkdtemp(prefix=f"lorabooth-{family}-config-"))
        config = str((sdxl_config_dir if family == "sdxl" else sd15_config_dir)(scratch))
    try:
        pipe = load_single_file(path, config, family)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return BaseModel(name, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                     DDPMScheduler.from_config(pipe.scheduler.config), FAMILIES[family],
                     getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))


def _load_flux_single(path: Path, name: str, config: str, family: str, load_transformer):
    """A FLUX transformer file in BFL's layout; the VAE, text encoders and
    tokenizers (which such files do not hold) from ``config``, a diffusers
    folder of the same family (its transformer/config.json, when there,
    gives the transformer's config; else the built-in one)."""
    from ..core.fileio import load_json
    from .flux_architecture import check_flux_folder, flux_folder_family, load_flux_folder

    title = "FLUX.2 [klein]" if family == "flux2" else "FLUX.1"
    if not config:
        raise UserError(f"--model {name}: a {title} transformer file holds no VAE, text encoder "
                        f"or tokenizer; give --model-config a {title} diffusers folder for them")
    folder = Path(config).expanduser()
    if flux_folder_family(folder) != family:
        raise UserError(f"--model-config {config}: not a {title} diffusers folder "
                        f"(model_index.json names another pipeline), for the {title} file {name}")
    check_flux_folder(folder, config, family, ("vae", "text_encoder", "tokenizer"))
    held = folder / "transformer" / "config.json"
    transformer = load_transformer(path, family, load_json(held) if held.is_file() else None)
    return load_flux_folder(folder, name, family, transformer=transformer)


def load_base(model: str, model_config: str = "",
              unet_dtype: torch.dtype = torch.float32, precision: str = "auto") -> BaseModel:
    """`tiny`, `toy`, a local diffusers folder, a single checkpoint file in
    the original layout (configs from ``model_config``, default SD 1.5), or a
    hub id (cache first). Folders load the UNet straight into ``unet_dtype``
    (and with a quantised ``precision``, --base-precision, its Linears
    quantised one by one as they stream in); the other sources are fp32 (the
    trainer casts and quantises them)."""
    if model == "tiny":
        return build_tiny()
    if model == "sd15-random":
        return build_sd15_random()
    if model in ("tiny-sdxl", "sdxl-random"):
        from .sdxl_architecture import build_sdxl_random, build_tiny_sdxl

        return build_tiny_sdxl() if model == "tiny-sdxl" else build_sdxl_random()
    if model in BUILTIN_FLUX:
        from .flux_architecture import build_builtin_flux

        return build_builtin_flux(model)
    if model == "flow-toy":
        return _load_flow_toy(unet_dtype, precision)
    if model == "toy":
        if not (toy_model_dir() / "unet").is_dir():
            raise UserError("--model toy: the toy model is not in this installation; "
                            "make it with `lorabooth toyworld pretrain --out DIR` and pass DIR")
        # CLIP's own tokenizer, rebuilt from open_clip's vocabulary: the
        # package does not ship a 3.6 MB copy of it
        return _load_folder(toy_model_dir(), "toy", unet_dtype, tokenizer=clip_tokenizer(),
                            precision=precision)
    path = Path(model).expanduser()
    refuse_adapter(path, model)
    if path.is_file():
        from ..formats.singlefile import SINGLE_FILE_SUFFIXES

        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"--model {model}: is a file but not a checkpoint "
                            f"({', '.join(SINGLE_FILE_SUFFIXES)}); or give a diffusers folder")
        return _load_single(path, model, model_config)
    if path.exists():
        return _load_folder(path, model, unet_dtype, precision=precision)
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"--model {model}: no such folder, and not a hub id (owner/name); "
                        f"built-in models: {', '.join(BUILTIN_MODELS)}")
    return _load_folder(resolve_hub(model), model, unet_dtype, precision=precision)


# What a lorabooth run folder (or one of its checkpoints) holds, and a base model never does
RUN_MARKS = (WEIGHT_NAME, KOHYA_WEIGHT_NAME, "lora.safetensors", "checkpoints")


def refuse_adapter(path: Path, model: str) -> None:
    """A LoRA file or a run folder given where a base model belongs is one
    line saying so (not a loader's error about missing configs or keys)."""
    if path.is_dir() and not (path / "unet").is_dir():
        held = [name for name in RUN_MARKS if (path / name).exists()]
        if held:
            raise UserError(f"--model {model}: is a LoRA run folder (it holds {held[0]}), not a "
                            f"base model; pass the base model the LoRA was trained on")
    elif path.exists() and not path.is_dir():
        from ..formats.singlefile import SINGLE_FILE_SUFFIXES
        from .sdxl_architecture import single_file_keys

        keys = single_file_keys(path) if path.suffix.lower() in SINGLE_FILE_SUFFIXES else []
        if any("lora" in k.lower() for k in keys):
            raise UserError(f"--model {model}: is a LoRA file, not a base model; give it as the "
                            f"run and --model the base model it was trained on")


def model_family(model: str) -> str | None:
    """"sdxl", "sd1", "flux2" or "flux1" for a built-in name, a diffusers
    folder or a single file, read from names and key lists only (no
    weights); None for a hub id (not looked up here). A LoRA file or run
    folder is refused (one line)."""
    from .flux_architecture import flux_folder_family
    from .flux_singlefile import bfl_family
    from .sdxl_architecture import file_family, folder_family, single_file_keys

    path = Path(model).expanduser()
    if model in BUILTIN_MODELS:
        if model == "flow-toy":
            return "flux2"
        return BUILTIN_FLUX.get(model) or ("sdxl" if "sdxl" in model else "sd1")
    refuse_adapter(path, model)
    if path.is_dir():
        return flux_folder_family(path) or folder_family(path)
    if path.is_file():
        return bfl_family(single_file_keys(path)) or file_family(path)
    return None


def family_of_model(model: str) -> Family:
    """``model``'s family, read from names and key lists only (a hub id
    from the local cache, failing fast offline)."""
    family = model_family(model)
    if family is None:  # a hub id
        family = model_family(str(_hub_path(model)))
    return FAMILIES[family or "sd1"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_path(model: str) -> Path:
    """A hub id's local snapshot; anything else that is no file or folder
    here is refused in one line."""
    if not _HUB_ID.match(model):
        raise UserError(f"--model {model}: no such model folder or file, and not a hub id")
    return resolve_hub(model)


# the built-in models small enough to build to read their size
_SMALL_BUILTINS = ("tiny", "toy", "tiny-sdxl", "tiny-flux2", "tiny-flux")


def model_resolution(model: str) -> int:
    """``model``'s native image side in pixels without loading its weights
    (the tiny built-ins are built: seconds): a diffusers folder's UNet and
    VAE configs say it; a transformer folder, a single file and the random
    full architectures take their family's (SD 1.x 512, SDXL and FLUX 1024)."""
    if model in _SMALL_BUILTINS:
        return load_base(model).native_resolution
    path = Path(model).expanduser()
    if not path.exists() and model not in BUILTIN_MODELS:
        path = _hub_path(model)
    unet, vae = path / "unet" / "config.json", path / "vae" / "config.json"
    if path.is_dir() and unet.is_file() and vae.is_file():
        from ..core.fileio import load_json

        size = load_json(unet, "--model").get("sample_size")
        levels = len(load_json(vae, "--model").get("block_out_channels", ()))
        if isinstance(size, int) and levels:
            return size * 2 ** (levels - 1)
    return family_of_model(str(path) if path.exists() else model).resolution


def model_guidance(model: str) -> float:
    """The guidance scale ``model``'s family draws with by default."""
    return family_of_model(model).guidance


def load_tokenizer(model: str) -> CLIPTokenizer:
    """Only the (first) tokenizer of a base model (no weights loaded)."""
    return load_tokenizers(model)[0]


def load_tokenizers(model: str) -> list:
    """The tokenizers of a base model's text encoders that read the prompt
    (no weights loaded): CLIP's for SD 1.x and SDXL (its second has the same
    vocabulary), Qwen3's byte-level BPE for FLUX.2, CLIP's and T5's unigram
    for FLUX.1."""
    builtin = BUILTIN_FLUX.get(model)
    if builtin:
        from .flux_tokenizers import qwen_tokenizer, t5_tokenizer

        return [qwen_tokenizer()] if builtin == "flux2" else [clip_tokenizer(), t5_tokenizer()]
    if model == "flow-toy":  # its own BPE, learnt from the toy captions
        model = str(flow_toy_model_dir())
    elif model in BUILTIN_MODELS:
        return [clip_tokenizer()]  # the built-in models use CLIP's own tokenizer (SDXL: the first)
    path = Path(model).expanduser()
    if not path.is_dir():
        if path.exists() or model.count("/") != 1:
            raise UserError(f"--model {model}: no such model folder, and not a hub id")
        path = resolve_hub(model)
    if not (path / "tokenizer").is_dir():
        raise UserError(f"--model {model}: no tokenizer/ folder in {path}")
    from .flux_architecture import flux_folder_family, flux_tokenizer

    family = flux_folder_family(path)
    if family:  # Qwen's BPE (FLUX.2), or CLIP's and T5's (FLUX.1), as the folder says
        if family == "flux1" and not (path / "tokenizer_2").is_dir():
            raise UserError(f"--model {model}: no tokenizer_2/ folder (T5's) in {path}")
        subs = ("tokenizer", "tokenizer_2") if family == "flux1" else ("tokenizer",)
        return [flux_tokenizer(path, sub, family) for sub in subs]
    return [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]


def pipeline_from_parts(base: BaseModel, scheduler=None) -> StableDiffusionPipeline:
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline,
    Flux2KleinPipeline or FluxPipeline) over the same modules (no copies);
    the family's sampler (DPM-Solver++; FLUX: flow-matching Euler) unless told."""
    if scheduler is None:
        scheduler = base.family.sampler(base.noise_scheduler)
    components = {"vae": base.vae, "unet": base.unet, "tokenizer": base.tokenizer,
                  "text_encoder": base.text_encoder, "tokenizer_2": base.tokenizer_2,
                  "text_encoder_2": base.text_encoder_2}
    return base.family.pipeline(components, scheduler)


def save_base(base: BaseModel, folder: str | Path) -> Path:
    """Write a base model as a diffusers folder (used to test the folder path)."""
    pipeline_from_parts(base, base.noise_scheduler).save_pretrained(folder)
    return Path(folder)

def sd15_config_dir(folder: Path) -> Path:
    """Stable Diffusion 1.5's component configs (no weights) written into
    ``folder``, so a single SD 1.x file loads without the hub."""
    from ..core.fileio import to_json

    def write(sub: str, config: dict) -> None:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(to_json(config))

    write("unet", {"_class_name": "UNet2DConditionModel", "sample_size": 64,
                   "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                   "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                   "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                   "cross_attention_dim": 768, "attention_head_dim": 8})
    write("vae", {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
                  "down_block_types": ["DownEncoderBlock2D"] * 4,
                  "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4,
                  "layers_per_block": 2, "sample_size": 512, "scaling_factor": 0.18215})
    write("text_encoder", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                           "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "max_position_embeddings": 77,
                           "hidden_act": "quick_gelu", "vocab_size": 49408, "projection_dim": 768,
                           "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1})
    sd_noise_scheduler().save_pretrained(folder / "scheduler")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(to_json({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return folder


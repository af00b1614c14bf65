import dataclasses

import pytest
import tomli_w

from lorabooth.config import TrainConfig, build_config, check_keys
from lorabooth.core.errors import UserError

GOOD = dict(instance_dir="photos", instance_prompt="a photo of sks dog")


def test_defaults_follow_the_brief():
    c = TrainConfig(**GOOD)
    assert (c.lr, c.lr_text, c.steps, c.batch_size, c.rank) == (5e-4, 1e-4, 300, 1, 4)
    assert c.num_class_images == 100 and c.prior_loss_weight == 1.0
    assert c.lora_alpha == 4.0  # alpha defaults to the rank
    assert TrainConfig(**GOOD, alpha=8).lora_alpha == 8.0


@pytest.mark.parametrize("key,value,option", [
    ("lr", 0.0, "--lr"), ("lr", -1e-4, "--lr"), ("lr_text", 0.0, "--lr-text"),
    ("rank", 0, "--rank"), ("rank", -2, "--rank"), ("alpha", -1.0, "--alpha"),
    ("resolution", 100, "--resolution"), ("steps", 0, "--steps"),
    ("batch_size", 0, "--batch-size"), ("mixed_precision", "fp8", "--mixed-precision"),
    ("prior_loss_weight", 0.0, "--prior-loss-weight"), ("num_class_images", 0, "--num-class-images"),
    ("checkpoint_every", -1, "--checkpoint-every"), ("adapter", "qlora", "--adapter"),
    ("validation_images", 0, "--validation-images"), ("validation_images", 65, "--validation-images"),
])
def test_bad_values_name_the_option(key, value, option):
    with pytest.raises(UserError) as e:
        TrainConfig(**{**GOOD, key: value})
    assert str(e.value).startswith(option + ":")
    assert "\n" not in str(e.value)


def test_prior_preservation_needs_a_class_prompt():
    with pytest.raises(UserError, match="--class-prompt"):
        TrainConfig(**GOOD, prior_preservation=True)
    TrainConfig(**GOOD, prior_preservation=True, class_prompt="a photo of a dog")


def test_required_fields():
    with pytest.raises(UserError, match="--instance-dir"):
        TrainConfig(instance_prompt="a photo of sks dog")
    with pytest.raises(UserError, match="--instance-prompt"):
        TrainConfig(instance_dir="photos")


def test_class_path_defaults_inside_output():
    assert str(TrainConfig(**GOOD, output="runs/x").class_path) == "runs/x/class_images"
    assert str(TrainConfig(**GOOD, class_dir="cls").class_path) == "cls"


def test_toml_then_command_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('instance_dir = "p"\ninstance_prompt = "a photo of sks cat"\nsteps = 7\nlr = 1\n'
                 'prior_preservation = true\nclass_prompt = "a photo of a cat"\n')
    c = build_config(TrainConfig, f, {"steps": 9, "rank": None})
    assert c.steps == 9 and c.rank == 4 and c.lr == 1.0 and c.prior_preservation == "images"


def test_toml_unknown_key_suggests_the_closest(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('instance_dir = "p"\nlearning_rate = 1e-4\nnum_clas_images = 3\n')
    with pytest.raises(UserError) as e:
        build_config(TrainConfig, f, {})
    assert "learning_rate" in str(e.value) or "num_clas_images" in str(e.value)
    with pytest.raises(UserError, match="did you mean `num_class_images`"):
        check_keys(TrainConfig, {"num_clas_images": 3}, "x.toml")


@pytest.mark.parametrize("key,value", [("steps", "ten"), ("steps", 1.5), ("lr", "fast"),
                                       ("prior_preservation", 3), ("model", 3)])
def test_toml_wrong_type_names_the_key(key, value):
    with pytest.raises(UserError, match=f"`{key}`"):
        check_keys(TrainConfig, {key: value}, "x.toml")


def test_bad_toml_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("steps = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        build_config(TrainConfig, f, {})
    with pytest.raises(UserError, match="no such file"):
        build_config(TrainConfig, tmp_path / "missing.toml", {})


@pytest.mark.parametrize("given,mode", [(False, "off"), (True, "images"), ("off", "off"),
                                        ("images", "images"), ("model", "model")])
def test_prior_preservation_modes_and_the_old_bool(given, mode):
    """It was a bool: True (Python, TOML true, a sweep grid) still means class images."""
    c = TrainConfig(**GOOD, class_prompt="a photo of a dog", prior_preservation=given)
    assert c.prior_preservation == mode  # the mode string, also in config.toml and metadata
    assert (c.uses_prior, c.prior_images, c.prior_model) == (
        mode != "off", mode == "images", mode == "model")


def test_prior_preservation_toml_bool_and_mode(tmp_path):
    f = tmp_path / "c.toml"
    for text, mode in (("true", "images"), ("false", "off"), ('"model"', "model")):
        f.write_text(f'instance_dir = "p"\ninstance_prompt = "a photo of sks cat"\n'
                     f'class_prompt = "a photo of a cat"\nprior_preservation = {text}\n')
        assert build_config(TrainConfig, f, {}).prior_preservation == mode


@pytest.mark.parametrize("value", ["yes", "true", "Model", ""])
def test_prior_preservation_other_values_name_the_option(value):
    with pytest.raises(UserError) as e:
        TrainConfig(**GOOD, class_prompt="a photo of a dog", prior_preservation=value)
    assert str(e.value).startswith("--prior-preservation: must be one of off, images, model")


def test_model_prior_needs_a_class_prompt():
    with pytest.raises(UserError, match="--class-prompt"):
        TrainConfig(**GOOD, prior_preservation="model")


def test_levers_default_off_and_round_trip_toml_and_command_line(tmp_path):
    from lorabooth.commands.cli import build_parser
    from lorabooth.config import to_toml_dict

    c = TrainConfig(**GOOD)
    assert (c.snr_gamma, c.noise_offset, c.caption_dropout, c.ema_decay) == (0, 0, 0, 0)
    f = tmp_path / "c.toml"
    f.write_text('instance_dir = "p"\ninstance_prompt = "a photo of sks cat"\nsnr_gamma = 5\n'
                 'noise_offset = 0.05\ncaption_dropout = 0.1\nema_decay = 0.99\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--ema-decay", "0.9"])
    c = build_config(TrainConfig, args.config, {k.name: getattr(args, k.name)
                                                for k in dataclasses.fields(TrainConfig)})
    assert (c.snr_gamma, c.noise_offset, c.caption_dropout, c.ema_decay) == (5, 0.05, 0.1, 0.9)
    f.write_text(tomli_w.dumps(to_toml_dict(c)))  # what a run's config.toml holds
    assert build_config(TrainConfig, f, {}) == c


def test_a_fields_choices_are_checked_when_the_config_is_built():
    """--scheduler was refused only after the model had loaded; its choices
    on the field now refuse it at once, as for every field with choices."""
    from lorabooth.config import GenerateConfig

    with pytest.raises(UserError, match=r"^--scheduler: must be one of dpm, ddim, euler, pndm "
                                        r"\(got 'x'\)"):
        GenerateConfig(run="r", prompt=["p"], scheduler="x")


def test_the_pages_dropdowns_are_the_fields_choices():
    from lorabooth.config import PRIOR_MODES, SAVE_FORMATS
    from lorabooth.ui.trainform import form_fields

    menus = {f.name: f.choices for f in form_fields() if f.choices}
    assert menus["prior_preservation"] == PRIOR_MODES
    assert menus["save_format"] == SAVE_FORMATS
    assert set(menus) == {"prior_preservation", "mixed_precision", "save_format", "adapter",
                          "timestep_sampling", "base_precision", "optimizer", "lr_scheduler",
                          "targets"}


def test_a_keyword_call_builds_the_same_config_once():
    """`generate`, `evaluate` and `merge` take their config or their old
    keywords; either way the config alone holds the defaults and checks."""
    from pathlib import Path

    from lorabooth.config import EvaluateConfig, GenerateConfig, MergeConfig, config_of
    from lorabooth.generation import _KEYWORDS

    by_keywords = config_of(GenerateConfig, "generate",
                            {"run": Path("r"), "prompts": ["a dog"], "unet_scales": (0, 1),
                             "output": None, "negative_prompt": None}, _KEYWORDS)
    assert by_keywords == GenerateConfig(run="r", prompt=["a dog"], unet_scale=[0, 1])
    config = GenerateConfig(run="r", prompt=["a dog"])
    assert config_of(GenerateConfig, "generate", {"run": config, "prompts": None}) is config
    with pytest.raises(TypeError, match="no other options"):
        config_of(GenerateConfig, "generate", {"run": config, "steps": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        config_of(GenerateConfig, "generate", {"run": "r", "prompts": ["a"], "stepz": 2},
                  _KEYWORDS)
    with pytest.raises(UserError, match="--num-images"):
        config_of(GenerateConfig, "generate", {"run": "r", "prompts": ["a"], "num_images": 0},
                  _KEYWORDS)
    assert config_of(EvaluateConfig, "evaluate", {"run": "r", "real": "p",
                                                  "prompts_file": None, "out": Path("o")},
                     {"prompts_file": "prompts"}) == EvaluateConfig(run="r", real="p", out="o")
    with pytest.raises(UserError, match="--weights: 1 weights for 2 LoRAs"):
        MergeConfig(loras=["a", "b"], weights=[1.0], out="m.safetensors")
    with pytest.raises(UserError, match="at least two LoRAs"):
        MergeConfig(loras=["a"], out="m.safetensors")


def test_the_schedulers_drawn_are_the_configs_choices():
    from lorabooth.config import SCHEDULERS
    from lorabooth.generation import SCHEDULERS as BUILT

    assert tuple(BUILT) == SCHEDULERS

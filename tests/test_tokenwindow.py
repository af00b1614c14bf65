"""The text encoder's token window (tokenwindow.py) on CLIP's own tokenizer,
and on a second tokenizer with a shorter window (the limit is each
tokenizer's model_max_length, not 77)."""

import copy
import logging

import pytest

from lorabooth.config import TrainConfig
from lorabooth.core.errors import UserError
from lorabooth.models.loading import clip_tokenizer
from lorabooth.models.tokenwindow import check_prompt, fit


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer()


def test_the_identifier_past_the_window_is_cut(clip):
    assert clip.model_max_length == 77
    # "a" is one token: 74 of them and the identifier fill the 75 places between start and end
    assert fit([clip], "a " * 74 + "sks", ["sks"]).cut == ()
    last = fit([clip], "a " * 75 + "sks", ["sks"])
    assert last.cut == ("sks",) and last.truncated and last.tokens == 76


def test_a_shorter_second_tokenizer_decides(clip):
    short = copy.deepcopy(clip)
    short.model_max_length = 20
    prompt = "a " * 30 + "sks dog"
    assert fit([clip], prompt, ["sks"]).cut == ()
    both = fit([clip, short], prompt, ["sks"])
    assert both.cut == ("sks",) and both.window == 20


def test_identifier_past_the_window_refused(clip):
    with pytest.raises(UserError, match="--instance-prompt: the identifier 'sks' falls past the "
                                        "text encoder's 77-token window"):
        check_prompt([clip], "a photo of " + "very " * 2000 + "sks dog", ["sks"],
                     "--instance-prompt")


def test_ten_thousand_characters_warned_once(clip, caplog):
    prompt = ("a photo of sks dog " + "in a garden " * 900)[:10000]
    with caplog.at_level(logging.WARNING):
        f = check_prompt([clip], prompt, ["sks"], "--prompt")
    assert f.truncated and f.cut == ()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("--prompt: the prompt is truncated at 77 tokens")


def test_a_short_prompt_says_nothing(clip, caplog):
    with caplog.at_level(logging.WARNING):
        assert not check_prompt([clip], "a photo of sks dog", ["sks"], "--prompt").truncated
    assert caplog.records == []


def test_a_cut_caption_is_warned_not_refused(clip, caplog):
    with caplog.at_level(logging.WARNING):
        f = check_prompt([clip], "a " * 80 + "sks dog", ["sks"], "--captions: x.txt",
                         refuse_cut=False)
    assert f.cut == ("sks",)
    assert "--captions: x.txt: the prompt is truncated" in caplog.text
    assert "which holds the identifier 'sks'" in caplog.text


@pytest.mark.parametrize("key,value,says", [
    ("steps", 1e23, "--steps: must be a whole number (got 1e+23)"),
    ("steps", 10**9, "--steps: at most 100000"),
    ("checkpoint_every", 10**9, "--checkpoint-every: must be between 0 and 100000"),
    ("num_class_images", 10**9, "--num-class-images: at most 10000"),
    ("batch_size", 10**6, "--batch-size: at most 256"),
    ("rank", True, "--rank: must be a whole number (got True)"),
    ("resolution", 8_000_000, "--resolution: must be a positive multiple of 8, at most 4096"),
])
def test_train_counts_bounded(key, value, says):
    with pytest.raises(UserError) as e:
        TrainConfig(instance_dir="p", instance_prompt="a photo of sks dog", **{key: value})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_generate_size_refused_before_any_allocation(monkeypatch):
    import torch

    from lorabooth.commands import GenerateConfig

    def refuse(*a, **k):
        raise AssertionError("allocated")
    monkeypatch.setattr(torch, "randn", refuse)
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(UserError, match="--width: must be a positive multiple of 8 pixels, at "
                                        "most 4096 .got 8000000."):
        GenerateConfig(run="r", prompt=["x"], width=8_000_000)

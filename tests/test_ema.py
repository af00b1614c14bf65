import pytest
import torch

from lorabooth.training.checkpoint import load_trainable_state, trainable_state
from lorabooth.training.ema import ema_load, ema_shadow, ema_state, ema_update


def _weights(modules):  # trainable_state's tensors share the parameters' storage
    return {k: v.clone() for k, v in trainable_state(modules).items()}


def _modules():
    torch.manual_seed(0)
    unet, text = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    text.bias.requires_grad_(False)  # frozen: not averaged
    return {"unet": unet, "text_encoder": text}


def test_no_decay_no_shadow():
    assert ema_shadow(_modules(), 0.0) is None and ema_state(None) is None


def test_shadow_follows_the_formula():
    modules = _modules()
    shadow = ema_shadow(modules, 0.9)
    assert set(shadow) == {"unet/weight", "unet/bias", "text_encoder/weight"}
    w0 = {k: v.clone() for k, v in shadow.items()}
    assert all(torch.equal(w0[k], v) for k, v in trainable_state(modules).items())
    with torch.no_grad():
        for p in modules["unet"].parameters():
            p.add_(1.0)
    w1 = _weights(modules)
    ema_update(shadow, modules, 0.9, 1000)  # past the warm-up
    for k in shadow:
        assert torch.allclose(shadow[k], 0.9 * w0[k] + 0.1 * w1[k], atol=1e-7), k
    assert not torch.equal(shadow["unet/weight"], w1["unet/weight"])
    with torch.no_grad():
        modules["unet"].weight.mul_(-2)
    w2 = _weights(modules)
    ema_update(shadow, modules, 0.9, 1000)  # past the warm-up
    expected = 0.9 * (0.9 * w0["unet/weight"] + 0.1 * w1["unet/weight"]) + 0.1 * w2["unet/weight"]
    assert torch.allclose(shadow["unet/weight"], expected, atol=1e-6)


def test_shadow_saves_loads_and_goes_into_the_modules():
    modules = _modules()
    shadow = ema_shadow(modules, 0.5)
    with torch.no_grad():
        modules["unet"].weight.add_(2.0)
    ema_update(shadow, modules, 0.5, 1000)
    saved = ema_state(shadow)
    assert all(v.device.type == "cpu" for v in saved.values())
    fresh = ema_shadow(_modules(), 0.5)
    ema_load(fresh, saved)
    assert all(torch.equal(fresh[k], shadow[k]) for k in shadow)
    with pytest.raises(ValueError, match="not this run's"):
        ema_load(fresh, {"unet/weight": torch.zeros(2, 3)})
    load_trainable_state(modules, shadow)  # what train does before writing the file
    assert torch.equal(modules["unet"].weight, shadow["unet/weight"])


def test_warm_up_decay_is_diffusers_convention():
    from lorabooth.training.ema import ema_decay_at

    # diffusers' EMAModel: min(decay, (1 + step) / (10 + step)), step counted from 0
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.9, 1000) == 0.9


def test_a_short_run_keeps_little_of_the_zero_init():
    """A LoRA up-projection starts at zero; with a fixed 0.99 decay, 10 steps
    would keep 0.99**10 = 90% of that zero in the saved weights. With the
    warm-up the first update keeps only a tenth of it."""
    modules = {"unet": torch.nn.Linear(2, 2, bias=False)}
    with torch.no_grad():
        modules["unet"].weight.zero_()
    shadow = ema_shadow(modules, 0.99)
    with torch.no_grad():
        modules["unet"].weight.fill_(1.0)
    for step in range(10):
        ema_update(shadow, modules, 0.99, step)
    # the shadow of a constant 1 after k warm-up updates: 1 - prod(decays)
    kept = 1.0
    for step in range(10):
        kept *= (1 + step) / (10 + step)
    assert torch.allclose(shadow["unet/weight"], torch.full((2, 2), 1 - kept))
    assert shadow["unet/weight"][0, 0] > 0.99


def test_ema_applied_swaps_the_average_in_and_back():
    from lorabooth.training.ema import ema_applied

    modules = _modules()
    shadow = {k: v + 5 for k, v in _weights(modules).items()}
    before = _weights(modules)
    with ema_applied(shadow, modules):
        assert torch.equal(modules["unet"].weight.detach(), shadow["unet/weight"])
    after = _weights(modules)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with ema_applied(None, modules):  # no EMA: the weights as they are
        assert torch.equal(modules["unet"].weight.detach(), before["unet/weight"])

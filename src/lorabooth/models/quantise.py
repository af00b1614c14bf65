"""--base-precision: the frozen base's ``nn.Linear`` weights stored
quantised (int8 or fp8 through torchao, nf4 through bitsandbytes), the LoRA
on top fp32, each weight dequantised in its layer's forward pass.

Why these libraries (measured on this CPU with torch 2.13, peft 0.21.2):
peft wraps both kinds of quantised Linear with a LoRA that trains
(``peft/tuners/lora/torchao.py``'s TorchaoLoraLinear for any torchao weight,
``bnb.py``'s Linear4bit for bitsandbytes' nf4), DoRA included, on the
UNet's and CLIP's odd shapes (37 x 32) alike. int8 is torchao's weight-only
int8 (one scale per output row), not bitsandbytes' Linear8bitLt, which also
trained here: torchao's weight stays an ``nn.Linear`` with a tensor
subclass in it (nothing else in the model changes), quantises one module as
it is streamed in, and gives fp8 (Float8WeightOnlyConfig) through the same
call. nf4 has no torchao form peft accepts (TorchaoLoraLinear refuses int4),
so it is bitsandbytes' Linear4bit, which has a CPU backend.

Only ``nn.Linear`` layers are quantised (convolutions, norms and embeddings
keep their dtype), and only before the LoRA is attached: peft then wraps
the quantised layer. The libraries are imported here only, when chosen.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from functools import cache
from typing import Iterator

import torch

from ..core.errors import UserError
from ..formats.lycoris import is_adapter_parameter

QUANTISED = ("int8", "nf4", "fp8")
# what the libraries print on import (a CUDA kernel that is not there, a
# kernels-hub hint, torch's pytree deprecation) says nothing to a user
_CHATTY = ("torchao", "bitsandbytes", "torch.utils._pytree")


def is_quantised(precision: str) -> bool:
    return precision in QUANTISED


@contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao_config(precision: str):
    with _quiet():
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    return Int8WeightOnlyConfig() if precision == "int8" else Float8WeightOnlyConfig()


def _nf4(linear: torch.nn.Linear) -> torch.nn.Module:
    """bitsandbytes' nf4 Linear4bit holding ``linear``'s weight (its bias
    kept as it is, possibly not yet loaded), computing in the weight's dtype."""
    with _quiet():
        import bitsandbytes as bnb

        weight = linear.weight.data
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        # _quantize packs the weight into 4-bit blocks with their scales (what
        # .to("cuda") does on a GPU); on the CPU it is called by name
        params = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer.weight = params.to(weight.device) if weight.is_cuda else params._quantize("cpu")
    layer.bias = linear.bias
    # bitsandbytes repacks the weight in place for its AVX512-bf16 inference
    # kernel on the first eval-mode forward: it fails on layers narrower than
    # a 64-value block (the tiny models' 32), and a training step after a
    # validation would then see the repacked weight. The plain dequantising
    # path serves both.
    layer.support_avx512bf16_for_cpu = False
    return layer.train(linear.training)


def is_plain_linear(module: torch.nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is still a plain tensor (not quantised,
    not wrapped by peft)."""
    return (type(module) is torch.nn.Linear and type(module.weight) is torch.nn.Parameter
            and module.weight.is_floating_point() and not module.weight.is_meta)


def quantise_linear(parent: torch.nn.Module, name: str, precision: str) -> None:
    """``parent.name`` (a plain Linear) quantised in place."""
    linear = getattr(parent, name)
    if precision == "nf4":
        linear = _nf4(linear)
        setattr(parent, name, linear)
    else:
        # peft warns, when it wraps the layer, that merging into it would
        # fail: lorabooth never merges into the quantised base (generate,
        # fuse and merge load the base unquantised). Outside _quiet, which
        # restores the filters it finds.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        with _quiet():
            from torchao.quantization import quantize_

            quantize_(linear, _torchao_config(precision))  # swaps the weight; the module stays
        linear.forward = _dequantising_forward.__get__(linear)
    linear.register_forward_pre_hook(_autocast_input)


class _DequantisedLinear(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen torchao weight ``W``, keeping only ``W``'s
    quantised form for the backward (dequantised again there). Through
    torchao's own dispatch autograd keeps each layer's dequantised weight
    until the backward: by the end of a forward, a bf16 copy of every
    quantised Linear, more memory than the bf16 base (measured:
    benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.weight = weight  # a reference to the frozen parameter, not a copy
        w = weight.dequantize().to(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.dequantize().to(grad.dtype), None, None  # W and b are frozen


def _dequantising_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _DequantisedLinear.apply(x, self.weight, self.bias)


def _autocast_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Autocast casts a plain Linear's input to its dtype (bf16) but not a
    quantised one's: torchao's weight-only matmul and bitsandbytes' (which
    casts its output back) would hand fp32 on to layers whose weights are
    bf16 (a GroupNorm refuses that mix on the CPU). Cast as autocast would."""
    x = args[0]
    device = x.device.type
    if not (x.is_floating_point() and torch.is_autocast_enabled(device)):
        return None
    return (x.to(torch.get_autocast_dtype(device)), *args[1:])


def quantise_module(module: torch.nn.Module, precision: str) -> int:
    """Every plain ``nn.Linear`` inside ``module`` quantised as ``precision``
    says (in place); returns how many. A no-op for auto."""
    if not is_quantised(precision):
        return 0
    found = [(parent, name) for parent in module.modules()
             for name, child in parent.named_children() if is_plain_linear(child)]
    for parent, name in found:
        quantise_linear(parent, name, precision)
    mark_quantised(module, precision)
    return len(found)


def mark_quantised(module: torch.nn.Module, precision: str) -> None:
    """peft dispatches LoRA onto bitsandbytes' layers only when the model
    says it was loaded in 4 bits (``LoraModel._create_and_replace``)."""
    if precision == "nf4":
        module.is_loaded_in_4bit = True


def streamed_quantiser(precision: str):
    """For ``lowmem.load_streamed``: called with (model, key) after each
    tensor is put in place, it quantises the Linear that tensor completes,
    so the model never holds more than one full-precision Linear at a time.
    None for auto."""
    if not is_quantised(precision):
        return None
    check_precision(precision)

    def after(model: torch.nn.Module, key: str) -> None:
        path, _, _ = key.rpartition(".")
        parent_path, _, name = path.rpartition(".")
        owner = model.get_submodule(path) if path else model
        if is_plain_linear(owner) and not any(p.is_meta for p in owner.parameters()):
            quantise_linear(model.get_submodule(parent_path) if parent_path else model,
                            name, precision)
    return after


def quantise_base(base, precision: str, dtype: torch.dtype, names: tuple[str, ...]) -> None:
    """The frozen Linears of ``base``'s components ``names`` (e.g. "unet",
    "text_encoder"; those set to None are skipped) quantised from their
    weights in ``dtype`` (the compute dtype they dequantise to); those
    already quantised while streamed in are left as they are. A denoiser
    with none is refused in one line."""
    if not is_quantised(precision):
        return
    from .precision import cast_frozen

    check_precision(precision)
    for name in names:
        module = getattr(base, name, None)
        if module is None:
            continue
        cast_frozen(module, dtype)
        quantise_module(module, precision)
        if name == "unet" and not any(_holds_quantised(m) for m in module.modules()):
            raise UserError(f"--base-precision {precision}: {base.name}'s denoiser has no "
                            f"linear layer to quantise")


def keep_out_of_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Several processes: DDP copies every parameter of rank 0 to the others
    when it wraps a module, and torchao's int8/fp8 tensors cannot be viewed
    as its flat buffers (NotImplementedError: aten.view). Each rank loaded
    the same frozen base, and the quantised weights never train, so DDP is
    told to leave them alone (torch's own hook for it, as FSDP's and
    torchrec's wrappers use); names as they are now, after peft wrapped the
    layers. Returns ``module``."""
    names = [n for n, p in module.named_parameters() if _is_quantised_tensor(p)]
    if names:
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return module


def _is_quantised_tensor(t: torch.Tensor) -> bool:
    return type(t) is not torch.nn.Parameter or not t.is_floating_point()


def _holds_quantised(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) and weight is not None and _is_quantised_tensor(weight)


def check_precision(precision: str) -> None:
    """One line where this machine cannot compute in ``precision``: fp8 is
    tried once on a small layer (it needs torch's float8 dtypes and a kernel
    that dequantises them on this device)."""
    if precision == "fp8" and not _fp8_works():
        raise UserError("--base-precision fp8: this torch/CPU cannot compute with fp8 weights "
                        "here; use int8 or nf4")


@cache
def _fp8_works() -> bool:
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    probe = torch.nn.Sequential(torch.nn.Linear(16, 16))
    try:
        quantise_module(probe, "fp8")
        with torch.no_grad():
            return bool(torch.isfinite(probe(torch.ones(1, 16))).all())
    except (RuntimeError, NotImplementedError, TypeError, ImportError):
        return False


def frozen_bytes(module: torch.nn.Module) -> int:
    """The bytes ``module``'s frozen weights occupy: every parameter but the
    adapter's (``lora_``, ``lokr_`` or ``hada_`` in its name, as
    ``precision.cast_frozen`` tells them apart), a quantised weight counted
    by what it stores (int8 or fp8 data and its scales; nf4's packed bytes
    and block scales), and its buffers."""
    total = sum(_tensor_bytes(p) for name, p in module.named_parameters()
                if not is_adapter_parameter(name))
    return total + sum(_tensor_bytes(b) for b in module.buffers())


def _tensor_bytes(t: torch.Tensor) -> int:
    state = getattr(t, "quant_state", None)  # bitsandbytes' Params4bit
    if state is not None:
        extra = sum(_tensor_bytes(x) for x in (state.absmax, state.code) if x is not None)
        nested = getattr(state, "state2", None)
        if nested is not None:
            extra += sum(_tensor_bytes(x) for x in (nested.absmax, nested.code) if x is not None)
        return t.data.numel() * t.data.element_size() + extra
    inner = getattr(t, "__tensor_flatten__", None)  # torchao's tensor subclasses
    if inner is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = inner()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()

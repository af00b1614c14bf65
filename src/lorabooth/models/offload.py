"""Block swap: the denoiser's last N blocks keep their frozen weights in
host memory and are copied to the GPU one block ahead of use, as sd-scripts'
``--blocks_to_swap`` and OneTrainer's layer offloading do.

A parked block's frozen parameters hold an empty tensor of their dtype on
the compute device (so peft's LoRA, created after parking, lands on the
right device and dtype, and a block run while parked fails loudly instead
of computing with something else); the weights themselves wait in host
memory (pinned on CUDA). The schedule:

- forward: before block i runs it is loaded (waiting for its prefetch) and
  the next swapped block's copy starts on a side stream; after it runs it
  is parked again;
- backward (the block's output gradient arrives, through an identity
  autograd function put on its outputs): it is loaded, and the previous
  swapped block is prefetched; once the gradient reaches its inputs it is
  parked. Gradient checkpointing's recomputation runs inside a block's
  backward, while it is loaded, and parks nothing;
- every forward of the whole denoiser starts with ``settle()``, which parks
  whatever a backward left loaded (a block whose inputs need no gradient
  never hears the end of its backward) and starts the forward schedule.

Only frozen weights move: LoRA's trainable parameters stay resident, so
the optimizer, EMA and checkpoints never see a swap. The weights are never
written (frozen), so parking drops the device copy without copying back.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError

# the denoiser's blocks in the order its forward runs them
BLOCK_LISTS = ("down_blocks", "mid_block", "up_blocks",  # UNet2DConditionModel
               "transformer_blocks", "single_transformer_blocks")  # FLUX.1 / FLUX.2


def denoiser_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's blocks in forward order (a UNet's down, mid and up
    blocks; a FLUX transformer's double- then single-stream blocks)."""
    blocks: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        part = getattr(module, name, None)
        if isinstance(part, torch.nn.ModuleList):
            blocks.extend(part)
        elif isinstance(part, torch.nn.Module):
            blocks.append(part)
    return blocks


def swap_blocks(denoiser: torch.nn.Module, swapped: int, device: torch.device | str) -> BlockSwap:
    """--blocks-to-swap N on a denoiser still in host memory (its frozen
    weights already in the compute dtype): the last N blocks parked."""
    blocks = denoiser_blocks(denoiser)
    if swapped > len(blocks):
        raise UserError(f"--blocks-to-swap {swapped}: the model's denoiser has {len(blocks)} "
                        f"blocks; give at most {len(blocks)}")
    return BlockSwap(blocks, swapped, device, root=denoiser)


class _OnBackward(torch.autograd.Function):
    """Identity on tensors; calls ``callback`` when their gradients arrive."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _on_backward(value, callback):
    """``value`` (a tensor, or a tuple/list/dict holding some) with its
    gradient-carrying tensors passed through one ``_OnBackward``."""
    found: list[torch.Tensor] = []

    def collect(v):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            found.append(v)
        elif isinstance(v, (tuple, list)):
            for x in v:
                collect(x)
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)

    collect(value)
    if not found:
        return value
    out = _OnBackward.apply(callback, *found)
    swapped = dict(zip(map(id, found), out if len(found) > 1 else (out,)))

    def rebuild(v):
        if isinstance(v, torch.Tensor):
            return swapped.get(id(v), v)
        if isinstance(v, (tuple, list)):
            return type(v)(rebuild(x) for x in v)
        if isinstance(v, dict):
            return {k: rebuild(x) for k, x in v.items()}
        return v

    return rebuild(value)


class BlockSwap:
    """Keeps the last ``swapped`` of ``blocks`` in host memory, loaded one
    at a time (plus the one prefetched) onto ``device``. ``events`` records
    ("load"|"park", block index) in order, for tests and for a look."""

    def __init__(self, blocks: list[torch.nn.Module], swapped: int,
                 device: torch.device | str, root: torch.nn.Module | None = None,
                 record: bool = False):
        if not 0 < swapped <= len(blocks):
            raise ValueError(f"swapped must be 1..{len(blocks)}, got {swapped}")
        self.blocks, self.device = blocks, torch.device(device)
        self.swapped = list(range(len(blocks) - swapped, len(blocks)))
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        for i in self.swapped:
            params = [p for p in blocks[i].parameters() if not p.requires_grad]
            self.host[i] = [(p, p.data.pin_memory() if cuda else p.data) for p in params]
        self.loaded: dict[int, torch.cuda.Event | None] = {}
        self.backward = False
        self.events: list[tuple[str, int]] | None = [] if record else None
        self.handles = []
        for i in self.swapped:
            self._park(i)
            self.handles.append(blocks[i].register_forward_pre_hook(self._before(i), with_kwargs=True))
            self.handles.append(blocks[i].register_forward_hook(self._after(i)))
        if root is not None:  # the denoiser: each of its forwards starts afresh
            self.handles.append(root.register_forward_pre_hook(lambda *_: self.settle()))

    def frozen_host_bytes(self) -> int:
        """The bytes of frozen weights kept in host memory."""
        return sum(t.numel() * t.element_size() for ps in self.host.values() for _, t in ps)

    def _note(self, what: str, i: int) -> None:
        if self.events is not None:
            self.events.append((what, i))

    def _load(self, i: int) -> None:
        """Start copying block i in (on the side stream on CUDA)."""
        if i in self.loaded:
            return
        self._note("load", i)
        if self.stream is None:
            for p, host in self.host[i]:
                p.data = host.to(self.device)
            self.loaded[i] = None
            return
        with torch.cuda.stream(self.stream):
            for p, host in self.host[i]:
                p.data = host.to(self.device, non_blocking=True)
                p.data.record_stream(torch.cuda.current_stream(self.device))
            event = torch.cuda.Event()
            event.record(self.stream)
        self.loaded[i] = event

    def _ready(self, i: int) -> None:
        """Block i loaded and its copy finished before the compute stream reads it."""
        self._load(i)
        event = self.loaded[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _park(self, i: int) -> None:
        if i in self.loaded:
            self._note("park", i)
        self.loaded.pop(i, None)
        for p, host in self.host[i]:
            p.data = torch.empty(0, dtype=host.dtype, device=self.device)

    def _neighbour(self, i: int, step: int) -> int | None:
        k = self.swapped.index(i) + step
        return self.swapped[k] if 0 <= k < len(self.swapped) else None

    def _before(self, i: int):
        def hook(module, args, kwargs):
            self._ready(i)
            if not self.backward:
                nxt = self._neighbour(i, +1)
                if nxt is not None:
                    self._load(nxt)
            if self.backward or not torch.is_grad_enabled():
                return None
            # one callback for every input: it fires once all their gradients are in
            return _on_backward((args, kwargs), lambda: self._leave_backward(i))
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            if self.backward:  # gradient checkpointing's recomputation
                return None
            self._park(i)
            if not torch.is_grad_enabled():
                return None
            return _on_backward(output, lambda: self._enter_backward(i))
        return hook

    def _enter_backward(self, i: int) -> None:
        self.backward = True
        self._ready(i)
        prev = self._neighbour(i, -1)
        if prev is not None:
            self._load(prev)

    def _leave_backward(self, i: int) -> None:
        if i in self.loaded and self.backward:
            self._park(i)

    def settle(self) -> None:
        """Park every swapped block; what runs next is a forward."""
        for i in list(self.loaded):
            self._park(i)
        self.backward = False

    def remove(self) -> None:
        """Load every block for good and take the hooks off."""
        for i in self.swapped:
            self._ready(i)
        for h in self.handles:
            h.remove()
        self.handles.clear()

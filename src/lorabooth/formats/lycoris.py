"""LoKr and LoHa (LyCORIS's adapters, trained through peft) in the key
layout ComfyUI and AUTOMATIC1111 read: `<kohya module>.lokr_w1`, `.lokr_w2`
(or their `_a`/`_b` factors), `.hada_w1_a` … `.hada_w2_b`, and `.alpha`.

The clients' formulas, from their published source (not copied):
- ComfyUI `comfy/weight_adapter/lokr.py` (`calculate_weight`): w1 = w1_a @ w1_b
  where factored, w2 likewise; ``dim`` = the rank of the factored one (w2's
  when both are); scale = alpha / dim, or 1 where neither is factored or the
  file has no alpha; delta = kron(w1, w2) (w1 given two trailing axes when w2
  is 4-D), reshaped to the weight. `loha.py`: delta = (w1_a @ w1_b) *
  (w2_a @ w2_b), reshaped, scale alpha / w1_b's rank.
- AUTOMATIC1111 `extensions-builtin/Lora/network_lokr.py` and
  `network_hada.py`: the same products; `network.py`'s `calc_scale` is
  alpha / dim with the same ``dim``, else 1.

peft scales both by alpha / r always (`LoKrLayer.update_layer`,
`LoHaLayer.update_layer`). Where a client's scale differs (a LoKr module
whose w1 and w2 are both whole, as peft builds them for narrow layers),
the export multiplies the scale into w1, so each client's delta is peft's.
Pure: tensors in, tensors out."""

from __future__ import annotations

import torch

LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
              "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# the trained parameters' name parts: peft's LoRA (lora_A, lora_B, DoRA's
# lora_magnitude_vector), LoKr (lokr_w1, lokr_w2_a, …) and LoHa (hada_w1_a, …)
TRAINED_PARTS = ("lora_", "lokr_", "hada_")
# Tucker (CP) cores: peft builds them only with use_effective_conv2d, which
# lorabooth leaves off; their axis conventions differ between peft and LyCORIS
CORES = ("lokr_t2", "hada_t1", "hada_t2")


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter's (trained), not the base's."""
    return any(part in name for part in TRAINED_PARTS)


def split_key(key: str) -> tuple[str, str] | None:
    """`…conv1.lokr_w2_a` -> (`…conv1`, `lokr_w2_a`); None for other keys."""
    module, _, part = key.rpartition(".")
    return (module, part) if part in LOKR_PARTS + LOHA_PARTS else None


def lycoris_kind(tensors) -> str | None:
    """"lokr", "loha" or None (a LoRA file) from a file's keys."""
    parts = {found[1] for k in tensors if (found := split_key(k))}
    if parts & set(LOKR_PARTS):
        return "lokr"
    return "loha" if parts & set(LOHA_PARTS) else None


def modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Each module's LyCORIS parts: {module: {part: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if found := split_key(key):
            out.setdefault(found[0], {})[found[1]] = value
    return out


def client_scale(parts: dict[str, torch.Tensor], alpha: float | None) -> float:
    """The scale ComfyUI and AUTOMATIC1111 apply to a module's product."""
    dim = None
    for factor in ("lokr_w1_b", "lokr_w2_b", "hada_w1_b"):  # later ones win, as in both
        if factor in parts:
            dim = parts[factor].shape[0]
    return alpha / dim if alpha is not None and dim is not None else 1.0


def to_clients(parts: dict[str, torch.Tensor], alpha: float, rank: int
               ) -> dict[str, torch.Tensor]:
    """A peft module's parts as the file holds them, with `alpha`: where the
    clients' scale is not peft's alpha / rank, w1 (or w1_a) carries the
    ratio. Refuses Tucker cores (ValueError)."""
    if cores := [p for p in CORES if p in parts]:
        raise ValueError(f"a Tucker core ({cores[0]}) has no verified client layout")
    out = dict(parts)
    ratio = (alpha / rank) / client_scale(parts, alpha)
    if ratio != 1.0:
        first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
        out[first] = out[first] * ratio
    out["alpha"] = torch.tensor(float(alpha))
    return out

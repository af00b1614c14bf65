"""FLUX.1's and FLUX.2 [klein]'s LoRA names outside diffusers: Black Forest
Labs' (BFL) original layout, which kohya's sd-scripts name their FLUX LoRA
modules after (`lora_unet_double_blocks_N_img_attn_qkv`, `..._img_attn_proj`,
`lora_unet_single_blocks_N_linear1`, ...) and which ComfyUI maps LoRA keys
onto (its `model_lora_keys_unet` takes `lora_unet_<BFL name>` for both
families: `comfy.model_base.Flux2` is a `Flux`). diffusers' transformers
split what BFL fuses:

- a double-stream block's image and text attention: BFL's one `qkv` Linear
  (out = 3h) is diffusers' `to_q`/`to_k`/`to_v` (`add_q_proj`/... for text);
- FLUX.1's single-stream block: BFL's `linear1` (out = 3h + 4h) is
  diffusers' `attn.to_q`/`to_k`/`to_v` and the MLP input `proj_mlp`; FLUX.2's
  diffusers keeps it fused (`attn.to_qkv_mlp_proj`), so it maps one to one.

Fusing the separate LoRAs of those parts into one LoRA on the fused weight is
exact, by rank concatenation: with parts i = 1..n of rank r (down A_i: r x in,
up B_i: out_i x r), the fused down is cat(A_1..A_n) (n*r x in), the fused up
is block-diagonal (rows of part i hold B_i in columns i*r..(i+1)*r, zeros
elsewhere), so up @ down stacks B_i @ A_i, each part's own delta, with
nothing across parts. The clients scale by alpha / (rank of the down), so the
fused alpha is n * alpha (alpha / rank stays alpha / r). A part that has no
LoRA gets zero rows: FLUX.1's `linear1` without a `proj_mlp` LoRA leaves the
MLP input unchanged, exactly as diffusers' model does.

Reading back is exact where diffusers' separate modules can hold the file:
our own block-diagonal files split back to rank r; a dense fused LoRA of the
same rank as the file's other modules (sd-scripts trains `qkv` as one
Linear) becomes one LoRA per part that shares the down matrix (each part's
delta is its rows of up @ down: exact, same rank). A dense fused LoRA of a
larger rank than the rest, or MLP rows in FLUX.1's `linear1` of a file that
has none in the other parts, would need mixed ranks, which lorabooth's files
do not hold: refused in one line."""

from __future__ import annotations

import re

import torch

from ..core.errors import UserError

FLUX1, FLUX2 = "flux1", "flux2"
FLUX_FAMILIES = (FLUX1, FLUX2)
FLUX_NAMES = {FLUX1: "FLUX.1", FLUX2: "FLUX.2 [klein]"}
PREFIX = "transformer."  # diffusers' (and peft's) name of the part
KOHYA_PREFIX = "lora_unet_"
# What kohya's sd-scripts write into a FLUX.1 LoRA's header, so model sites
# and UIs sort the file by base model.
FLUX_KOHYA_META = {FLUX1: {"ss_base_model_version": "flux1",
                           "modelspec.architecture": "flux-1-dev/lora"},
                   FLUX2: {"ss_base_model_version": "flux2",
                           "modelspec.architecture": "flux-2-klein/lora"}}

# diffusers module inside a block -> (BFL module inside the block, part of a
# fused weight or None). Parts are in the fused weight's row order.
_DOUBLE_ATTENTION = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_add_out": ("txt_attn.proj", None)}
BLOCKS = {
    FLUX1: {
        "double": {**_DOUBLE_ATTENTION,
                   "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
                   "ff_context.net.0.proj": ("txt_mlp.0", None),
                   "ff_context.net.2": ("txt_mlp.2", None),
                   "norm1.linear": ("img_mod.lin", None),
                   "norm1_context.linear": ("txt_mod.lin", None)},
        "single": {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
                   "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
                   "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None)}},
    FLUX2: {
        "double": {**_DOUBLE_ATTENTION,
                   "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
                   "ff_context.linear_in": ("txt_mlp.0", None),
                   "ff_context.linear_out": ("txt_mlp.2", None)},
        "single": {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}},
}
_BLOCK_NAMES = {"double": ("transformer_blocks", "double_blocks"),
                "single": ("single_transformer_blocks", "single_blocks")}
FUSED_PARTS = {"qkv": 3, "linear1": 4}  # FLUX.1's linear1: q, k, v, MLP input

# The LoRA targets, as diffusers names the modules (inside a block): the
# attention projections of both block kinds, and as an option their MLPs.
# FLUX.1's single-stream block has no attention output of its own (proj_out
# takes attention and MLP together), FLUX.2's fuses q, k, v and the MLP input.
ATTENTION_TARGETS = {
    FLUX1: {"double": tuple(_DOUBLE_ATTENTION), "single": ("attn.to_q", "attn.to_k", "attn.to_v")},
    FLUX2: {"double": tuple(_DOUBLE_ATTENTION), "single": ("attn.to_qkv_mlp_proj", "attn.to_out")}}
MLP_TARGETS = {
    FLUX1: {"double": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
            "single": ("proj_mlp", "proj_out")},
    FLUX2: {"double": ("ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                       "ff_context.linear_out"), "single": ()}}


def target_modules(family: str, mlp: bool = False, every: bool = False) -> str:
    """The LoRA targets as one regular expression over the transformer's
    module names (peft's `target_modules` as a string is matched in full;
    a list of suffixes would also catch FLUX.2's double-block `attn.to_out`,
    a ModuleList). ``every``: each block Linear BFL names (`BLOCKS`: the
    attention, the MLPs and FLUX.1's modulations)."""
    kinds = []
    for kind, (diffusers_block, _) in _BLOCK_NAMES.items():
        names = ATTENTION_TARGETS[family][kind] + (MLP_TARGETS[family][kind] if mlp else ())
        if every:
            names = tuple(BLOCKS[family][kind])
        if names:
            alternatives = "|".join(re.escape(n) for n in names)
            kinds.append(rf"{diffusers_block}\.\d+\.(?:{alternatives})")
    return "|".join(f"(?:{k})" for k in kinds)


def bfl_module(family: str, module: str) -> tuple[str, int | None] | None:
    """A diffusers transformer module (`transformer_blocks.3.attn.to_k`) ->
    (its BFL module `double_blocks.3.img_attn.qkv`, its part of it: 1), or
    None where BFL has no block module of that name."""
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
    if m is None:
        return None
    kind = "single" if m[1].startswith("single") else "double"
    found = BLOCKS[family][kind].get(m[3])
    if found is None:
        return None
    return f"{_BLOCK_NAMES[kind][1]}.{m[2]}.{found[0]}", found[1]


def diffusers_modules(family: str, bfl: str) -> dict[int | None, str]:
    """The inverse: a BFL module -> {part: diffusers module} (one entry, part
    None, where it is not fused); empty where diffusers has no such module."""
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", bfl)
    if m is None:
        return {}
    kind = "single" if m[1] == "single_blocks" else "double"
    return {part: f"{_BLOCK_NAMES[kind][0]}.{m[2]}.{name}"
            for name, (inner, part) in BLOCKS[family][kind].items() if inner == m[3]}


_KOHYA_MODULE = re.compile(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)")


def kohya_to_bfl(family: str, name: str) -> str | None:
    """`lora_unet_double_blocks_3_img_attn_qkv` -> `double_blocks.3.img_attn.qkv`
    (None for a name outside the family's blocks)."""
    m = _KOHYA_MODULE.fullmatch(name)
    if m is None:
        return None
    kind = "single" if m[1] == "single_blocks" else "double"
    inner = {i.replace(".", "_"): i for i, _ in BLOCKS[family][kind].values()}.get(m[3])
    return f"{m[1]}.{m[2]}.{inner}" if inner else None


def kohya_name(bfl: str) -> str:
    return KOHYA_PREFIX + bfl.replace(".", "_")


def _peft_modules(peft: dict[str, torch.Tensor], where: str) -> dict[str, tuple]:
    """`transformer.<module>.lora_A/B.weight` -> {module: (A, B)}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft.items():
        m = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise UserError(f"{where}: key {key} is not a FLUX transformer LoRA key "
                            "(transformer.<module>.lora_A/lora_B.weight)")
        modules.setdefault(m[1], {})[m[2]] = value
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{where}: module {module} lacks its lora_A or lora_B matrix")
    return {module: (pair["A"], pair["B"]) for module, pair in modules.items()}


def _fused_rows(family: str, bfl: str, parts: dict[int, tuple]) -> list[int]:
    """The row counts of a fused weight's parts: q, k and v the same (their
    out features); FLUX.1's MLP input 4h (its mlp_ratio, as in BFL's code)."""
    a = next(iter(parts.values()))[0]
    h = next((b.shape[0] for p, (_, b) in parts.items() if p != 3), a.shape[1])
    if bfl.endswith("linear1"):
        mlp = parts[3][1].shape[0] if 3 in parts else 4 * a.shape[1]
        return [h, h, h, mlp]
    return [h, h, h]


def to_bfl_kohya(family: str, peft: dict[str, torch.Tensor], alpha: float,
                 where: str = "LoRA") -> dict[str, torch.Tensor]:
    """Peft transformer tensors -> kohya's FLUX names over BFL's modules, the
    fused ones by rank concatenation (exact; see the module's docstring)."""
    groups: dict[str, dict[int | None, tuple]] = {}
    for module, pair in _peft_modules(peft, where).items():
        found = bfl_module(family, module)
        if found is None:
            raise UserError(f"{where}: module {module} has no {FLUX_NAMES[family]} "
                            "block name in kohya's layout; use the diffusers file")
        groups.setdefault(found[0], {})[found[1]] = pair
    out = {}
    for bfl, parts in sorted(groups.items()):
        name = kohya_name(bfl)
        if None in parts:
            down, up = parts[None]
            scale = 1.0
        else:
            rows = _fused_rows(family, bfl, parts)
            rank = next(iter(parts.values()))[0].shape[0]
            present = sorted(parts)
            down = torch.cat([parts[p][0] for p in present])  # (n*r, in)
            up = torch.zeros(sum(rows), rank * len(present), dtype=down.dtype)
            for column, p in enumerate(present):
                start = sum(rows[:p])
                up[start:start + rows[p], column * rank:(column + 1) * rank] = parts[p][1]
            scale = float(len(present))
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * scale)
    return out


def _kohya_modules(family: str, tensors: dict[str, torch.Tensor], where: str) -> dict[str, tuple]:
    """{BFL module: (down, up, alpha)} of a kohya FLUX file."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        bfl = kohya_to_bfl(family, name)
        if bfl is None or part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise UserError(f"{where}: key {key} names no {FLUX_NAMES[family]} block module "
                            "lorabooth reads")
        modules.setdefault(bfl, {})[part] = value
    out = {}
    for bfl, parts in modules.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None or up.shape[1] != down.shape[0]:
            raise UserError(f"{where}: {kohya_name(bfl)} lacks a matching lora_down/lora_up pair")
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        out[bfl] = (down, up, alpha)
    return out


def _block_diagonal(up: torch.Tensor, rows: list[int], n: int) -> bool:
    """Whether ``up``'s first n parts use only their own rank block and the
    parts after them no rows at all (zeros elsewhere)."""
    rank = up.shape[1] // n
    mask = torch.ones_like(up, dtype=torch.bool)
    for p in range(n):
        start = sum(rows[:p])
        mask[start:start + rows[p], p * rank:(p + 1) * rank] = False
    return bool((up[mask] == 0).all())


def _split_fused(bfl: str, down, up, alpha: float, rank: int, where: str):
    """A fused module's LoRA -> {part: (A, B, alpha)} of rank ``rank`` each."""
    h = down.shape[1] if bfl.endswith("linear1") else up.shape[0] // 3
    rows = [h, h, h] + ([up.shape[0] - 3 * h] if bfl.endswith("linear1") else [])
    big = down.shape[0]
    if big == rank:  # one dense fused LoRA (sd-scripts): the parts share the down
        parts = {}
        for p in range(len(rows)):
            start = sum(rows[:p])
            b = up[start:start + rows[p]]
            if p < 3 or bool((b != 0).any()):  # an untouched MLP input is no module
                parts[p] = (down.clone(), b.clone(), alpha)
        return parts
    n = big // rank
    if big % rank == 0 and n in (3, len(rows)) and _block_diagonal(up, rows, n):
        return {p: (down[p * rank:(p + 1) * rank].clone(),
                    up[sum(rows[:p]):sum(rows[:p + 1]), p * rank:(p + 1) * rank].clone(),
                    alpha / n) for p in range(n)}
    raise UserError(f"{where}: {kohya_name(bfl)} is a rank-{big} LoRA on the fused weight that "
                    f"separate rank-{rank} LoRAs cannot hold exactly; lorabooth reads only "
                    "one rank per file")


def from_bfl_kohya(family: str, tensors: dict[str, torch.Tensor], where: str = "LoRA"
                   ) -> tuple[dict[str, torch.Tensor], float]:
    """kohya's FLUX names -> (peft transformer tensors, alpha): the inverse
    of `to_bfl_kohya`, exact; a file that needs mixed ranks or alphas is
    refused in one line."""
    modules = _kohya_modules(family, tensors, where)
    if not modules:
        raise UserError(f"{where}: no LoRA modules")
    rank = min(down.shape[0] for down, _, _ in modules.values())
    peft, alphas = {}, set()
    for bfl, (down, up, alpha) in sorted(modules.items()):
        targets = diffusers_modules(family, bfl)
        if None in targets:
            if down.shape[0] != rank:
                raise UserError(f"{where}: mixed ranks ({down.shape[0]} at {kohya_name(bfl)}, "
                                f"{rank} elsewhere)")
            parts = {None: (down, up, alpha)}
        else:
            parts = _split_fused(bfl, down, up, alpha, rank, where)
        for part, (a, b, part_alpha) in parts.items():
            peft[f"{PREFIX}{targets[part]}.lora_A.weight"] = a
            peft[f"{PREFIX}{targets[part]}.lora_B.weight"] = b
            alphas.add(part_alpha)
    if len(alphas) > 1:
        raise UserError(f"{where}: modules use different alphas {sorted(alphas)}; "
                        "only one alpha per file is supported")
    return peft, alphas.pop()


def family_of_keys(tensors: dict[str, torch.Tensor]) -> str | None:
    """FLUX.1 or FLUX.2 from a LoRA's keys and shapes alone (None: not a
    FLUX LoRA, or nothing tells): FLUX.2's single-block `linear1` is
    3h + 6h wide (SwiGLU, mlp_ratio 3), FLUX.1's 3h + 4h."""
    # an SD UNet's feed-forward (--targets attn-mlp) is spelled as FLUX.1's
    keys = [k for k in tensors if not k.startswith(("unet.", "lora_unet_down_blocks_",
                                                    "lora_unet_mid_block_", "lora_unet_up_blocks_"))]
    if any(".to_qkv_mlp_proj." in k or ".ff.linear_in." in k or ".ff_context.linear_in." in k
           for k in keys):
        return FLUX2
    if any(k.startswith(PREFIX + "single_transformer_blocks.") or ".ff.net.0.proj." in k
           for k in keys):
        return FLUX1
    for key, value in tensors.items():
        if re.fullmatch(r"lora_unet_single_blocks_\d+_linear1\.lora_up\.weight", key):
            down = tensors.get(key.replace("lora_up", "lora_down"))
            if down is not None:
                return FLUX2 if value.shape[0] == 9 * down.shape[1] else FLUX1
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_",
                         PREFIX + "transformer_blocks.")) for k in keys):
        return FLUX1  # double blocks only: the names are the same; FLUX.1 has the most LoRAs
    return None

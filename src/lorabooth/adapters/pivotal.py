"""Pivotal tuning: besides the LoRA, learn the input embedding of the
identifier's token(s), textual inversion and LoRA together (as diffusers'
advanced DreamBooth example does).

The embedding matrix itself is never trained: a small parameter holds the
identifier's rows (started from their current values) and a forward hook on
the text encoder's token embedding puts them in place of the looked-up rows.
Every other row stays bit-identical, and the optimizer state is a few
vectors instead of the whole (49408, D) matrix. At the end the rows are
saved in the LoRA file, one (pieces, D) tensor per identifier word:
`lorabooth_emb.WORD` in the diffusers and peft layouts (a key holding
"lora" without a `unet.`/`text_encoder.` prefix, which diffusers'
`load_lora_weights` accepts and skips) and AUTOMATIC1111's bundled
embedding `bundle_emb.WORD.string_to_param.*` in the kohya layout."""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

from ..core.errors import UserError
from ..core.fileio import parse_json
from ..formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME

EMB_PREFIX = "lorabooth_emb."
BUNDLE_PREFIX, BUNDLE_SUFFIX = "bundle_emb.", ".string_to_param.*"
TRAINED_TOKENS = "lorabooth.trained_tokens"  # header: {word: [token ids]}


def word_ids(tokenizer, words: list[str]) -> dict[str, list[int]]:
    """Each identifier word -> its token ids (a rare word is one token)."""
    return {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}


def unique_ids(ids: dict[str, list[int]]) -> list[int]:
    return sorted({i for pieces in ids.values() for i in pieces})


def substitute_rows(embedded: torch.Tensor, ids: torch.Tensor, token_ids: torch.Tensor,
                    vectors: torch.Tensor) -> torch.Tensor:
    """``embedded`` (B, T, D), the lookup of ``ids`` (B, T), with every
    position holding ``token_ids[k]`` replaced by ``vectors[k]`` (K, D);
    gradients reach ``vectors`` only through those positions."""
    match = ids.unsqueeze(-1) == token_ids.to(ids.device)  # (B, T, K)
    hit = match.any(-1, keepdim=True)                        # (B, T, 1)
    chosen = match.to(vectors.dtype) @ vectors.to(embedded.device)  # (B, T, D); one k at most
    return torch.where(hit, chosen.to(embedded.dtype), embedded)


class TokenVectors(torch.nn.Module):
    """The trained rows of the identifier's tokens. Its forward is what the
    hook calls, so a distributed wrapper around it syncs their gradients."""

    def __init__(self, ids: dict[str, list[int]], initial: torch.Tensor) -> None:
        super().__init__()
        self.ids = ids
        self.token_ids = unique_ids(ids)  # a list, not a buffer: nothing to broadcast
        self.vectors = torch.nn.Parameter(initial.detach().float().clone())  # (K, D)

    def forward(self, input_ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        token_ids = torch.tensor(self.token_ids, device=input_ids.device)
        return substitute_rows(embedded, input_ids, token_ids, self.vectors)

    def by_word(self) -> dict[str, torch.Tensor]:
        """{word: (pieces, D)} fp32 CPU, as the files hold them."""
        row = {t: k for k, t in enumerate(self.token_ids)}
        vectors = self.vectors.detach().float().cpu()
        return {w: vectors[[row[i] for i in pieces]].contiguous() for w, pieces in self.ids.items()}


def token_embedding(text_encoder: torch.nn.Module) -> torch.nn.Embedding:
    return text_encoder.get_input_embeddings()


def setup_token(tokenizer, text_encoder: torch.nn.Module, words: list[str]) -> TokenVectors:
    """The identifier's rows as a trainable module, started from the encoder's."""
    if not words:
        raise UserError("--train-token: the instance prompt has no identifier word to train "
                        "(words in --instance-prompt that are not in --class-prompt)")
    ids = word_ids(tokenizer, words)
    weight = token_embedding(text_encoder).weight
    return TokenVectors(ids, weight[unique_ids(ids)].to("cpu"))


def attach(text_encoder: torch.nn.Module, token: torch.nn.Module) -> None:
    """From now on the encoder looks the identifier up in ``token`` (the
    module the loop holds, wrapped or not)."""
    def hook(_module, args, output):
        return token(args[0], output)
    token_embedding(text_encoder).register_forward_hook(hook)


def holds_tokens(ids: torch.Tensor, token: TokenVectors) -> bool:
    """Whether token ids ``ids`` use a trained row (their embedding then
    changes every step and cannot be cached)."""
    return bool(torch.isin(ids, torch.tensor(token.token_ids)).any())


# Each loading pipeline's text encoder -> its token ids, the base model's rows
# and the learned ones: the rows belong to the adapter, so a text scale
# moves them between the two (``scale_rows``).
_LOADED: WeakKeyDictionary = WeakKeyDictionary()


def write_rows(tokenizer, text_encoder: torch.nn.Module,
               embeddings: dict[str, torch.Tensor], where: str) -> None:
    """Put saved rows into ``text_encoder``'s embedding matrix, each word's
    tokens found with ``tokenizer``, remembering the base model's rows so
    that ``scale_rows`` can take them out again."""
    weight = token_embedding(text_encoder).weight
    ids, learned = [], []
    for word, vectors in embeddings.items():
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if vectors.ndim != 2 or len(pieces) != vectors.shape[0] or vectors.shape[1] != weight.shape[1]:
            raise UserError(f"{where}: the trained embedding of {word!r} has shape "
                            f"{tuple(vectors.shape)}; this base model needs ({len(pieces)}, "
                            f"{weight.shape[1]})")
        ids += pieces
        learned.append(vectors.float())
    if not ids:
        return
    if text_encoder in _LOADED:  # a second load starts from the base rows again
        scale_rows(text_encoder, 0.0)
    _LOADED[text_encoder] = (ids, weight[ids].detach().float().clone(), torch.cat(learned))
    scale_rows(text_encoder, 1.0)


def scale_rows(text_encoder: torch.nn.Module, scale: float) -> None:
    """The loaded identifier rows at ``scale``: base + scale * (learned -
    base), exactly the base model's rows at 0 and the learned ones at 1;
    nothing without loaded rows."""
    loaded = _LOADED.get(text_encoder)
    if loaded is None:
        return
    ids, base, learned = loaded
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():  # lerp is exact at both ends
        weight[ids] = torch.lerp(base, learned, float(scale)).to(weight.device, weight.dtype)


def split_embeddings(tensors: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A file's tensors -> (LoRA tensors, {word: (pieces, D)}), either spelling."""
    lora, embeddings = {}, {}
    for key, value in tensors.items():
        if key.startswith(EMB_PREFIX):
            embeddings[key[len(EMB_PREFIX):]] = value
        elif key.startswith(BUNDLE_PREFIX) and key.endswith(BUNDLE_SUFFIX):
            embeddings[key[len(BUNDLE_PREFIX):-len(BUNDLE_SUFFIX)]] = value
        else:
            lora[key] = value
    return lora, embeddings


def embedding_keys(embeddings: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "kohya":
        return {f"{BUNDLE_PREFIX}{w}{BUNDLE_SUFFIX}": v for w, v in embeddings.items()}
    return {f"{EMB_PREFIX}{w}": v for w, v in embeddings.items()}


def trained_tokens(header: dict[str, str]) -> dict[str, list[int]]:
    try:
        value = parse_json(header.get(TRAINED_TOKENS, "{}"), TRAINED_TOKENS)
        return value if isinstance(value, dict) else {}
    except UserError:
        return {}


def diffusers_lines(folder: str, words: list[str], kohya: bool) -> str:
    """The plain-diffusers lines that load a run's LoRA and its trained rows
    (``pipe`` a StableDiffusionPipeline of the base). The diffusers file's
    embedding key is skipped by `load_lora_weights`; a kohya file's bundled
    one is refused by it, so that file goes in as a state dict without it
    (its alphas are in its keys)."""
    if kohya:
        return (f"state = load_file({folder + '/' + KOHYA_WEIGHT_NAME!r})\n"
                f"vectors = {{w: state.pop(f'{BUNDLE_PREFIX}{{w}}{BUNDLE_SUFFIX}') "
                f"for w in {words!r}}}\n"
                f"pipe.load_lora_weights(state)\n" + _row_lines())
    return (f"pipe.load_lora_weights({folder!r})\n"
            f"state = load_file({folder + '/' + WEIGHT_NAME!r})\n"
            f"vectors = {{w: state[f'{EMB_PREFIX}{{w}}'] for w in {words!r}}}\n" + _row_lines())


def _row_lines() -> str:
    return ("with torch.no_grad():  # the identifier's learned input embedding\n"
            "    for word, rows in vectors.items():\n"
            "        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids\n"
            "        pipe.text_encoder.get_input_embeddings().weight[ids] = rows\n")

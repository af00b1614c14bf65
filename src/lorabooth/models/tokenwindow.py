"""The text encoder reads a fixed window of tokens (CLIP: 77, the start and
end tokens included; FLUX's T5: 512 with its end token; FLUX.2's Qwen3: 512
of the prompt in its chat template) and silently drops the rest of a longer
prompt. An identifier in the dropped part is never seen: never trained (its
embedding row with --train-token stays the base's exactly), never drawn.
These checks say so, in one line, for every tokenizer of the model (SDXL and
FLUX.1 have two), each with its own ``model_max_length``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.errors import UserError
from .families import encoder_text

log = logging.getLogger(__name__)
SPECIAL = 2  # CLIP's start and end tokens, which its window holds besides the prompt's


@dataclass(frozen=True)
class Fit:
    tokens: int  # the prompt's own tokens (no start/end), under the tokenizer that cuts most
    window: int  # the tokenizer's model_max_length, start and end tokens included
    cut: tuple[str, ...]  # identifier words whose tokens occur only in the part dropped
    extra: int = SPECIAL  # what the window holds besides the prompt (specials, a chat template)

    @property
    def truncated(self) -> bool:
        return self.tokens > self.window - self.extra

    @property
    def total(self) -> int:
        return self.tokens + self.extra


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special, truncation=False, verbose=False).input_ids


def _holds(ids: list[int], piece: list[int]) -> bool:
    n = len(piece)
    return n > 0 and any(ids[i:i + n] == piece for i in range(len(ids) - n + 1))


def fit(tokenizers: list, prompt: str, words: list[str]) -> Fit:
    """How ``prompt`` fits the window of each of ``tokenizers``: the worst one,
    and the identifier ``words`` present in the prompt but only past a window.
    The window holds what the encoder reads: the prompt with the tokenizer's
    special tokens, in its chat template where it has one (FLUX.2)."""
    worst, cut = None, []
    for tokenizer in tokenizers:
        window = int(tokenizer.model_max_length)
        own = _ids(tokenizer, prompt)
        text = encoder_text(tokenizer, prompt)
        ids = _ids(tokenizer, text)
        # truncation keeps the tokenizer's own specials (CLIP's start and end,
        # T5's end); a chat template's tail is cut like the prompt
        specials = len(_ids(tokenizer, text, special=True)) - len(ids)
        kept = ids[:window - specials]
        for word in words:
            # byte-level BPE (Qwen) spells a word after a space otherwise: "Ġsks", not "sks"
            pieces = [_ids(tokenizer, word), _ids(tokenizer, " " + word)]
            if word not in cut and any(_holds(ids, p) for p in pieces) \
                    and not any(_holds(kept, p) for p in pieces):
                cut.append(word)
        over = len(ids) + specials - window
        if worst is None or over > worst[0]:
            worst = (over, len(own), window, len(ids) + specials - len(own))
    if worst is None:
        raise ValueError("fit() needs at least one tokenizer")
    return Fit(worst[1], worst[2], tuple(cut), worst[3])


def cut_message(f: Fit, what: str) -> str:
    return (f"{what}: the identifier {' '.join(f.cut)!r} falls past the text encoder's "
            f"{f.window}-token window (the prompt holds {f.total} tokens), so it is "
            f"never read; shorten the prompt or move the identifier to its start")


def truncated_message(f: Fit, what: str) -> str:
    said = f"{what}: the prompt is truncated at {f.window} tokens (it holds {f.total}); " \
           f"the text encoder never reads the rest"
    if f.cut:
        said += f", which holds the identifier {' '.join(f.cut)!r}"
    return said


def check_prompt(tokenizers: list, prompt: str, words: list[str], what: str,
                 refuse_cut: bool = True) -> Fit:
    """Refuse ``prompt`` (``what`` names it) when the window drops its
    identifier and ``refuse_cut``; else warn once when it is truncated."""
    f = fit(tokenizers, prompt, words)
    if f.cut and refuse_cut:
        raise UserError(cut_message(f, what))
    if f.truncated:
        log.warning("%s", truncated_message(f, what))
    return f


def pipeline_tokenizers(pipe) -> list:
    """A pipeline's tokenizers: SDXL's second one too."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]

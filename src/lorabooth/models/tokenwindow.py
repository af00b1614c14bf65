"""The text encoder reads a fixed window of tokens (CLIP: 77, the start and
end tokens included) and silently drops the rest of a longer prompt. An
identifier in the dropped part is never seen: never trained (its embedding
row with --train-token stays the base's exactly), never drawn. These checks
say so, in one line, for every tokenizer of the model (SDXL has two), each
with its own ``model_max_length``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.errors import UserError

log = logging.getLogger(__name__)
SPECIAL = 2  # the start and end tokens the window holds besides the prompt's


@dataclass(frozen=True)
class Fit:
    tokens: int  # the prompt's own tokens (no start/end), under the tokenizer that cuts most
    window: int  # the tokenizer's model_max_length, start and end tokens included
    cut: tuple[str, ...]  # identifier words whose tokens occur only in the part dropped

    @property
    def truncated(self) -> bool:
        return self.tokens > self.window - SPECIAL


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _holds(ids: list[int], piece: list[int]) -> bool:
    n = len(piece)
    return n > 0 and any(ids[i:i + n] == piece for i in range(len(ids) - n + 1))


def fit(tokenizers: list, prompt: str, words: list[str]) -> Fit:
    """How ``prompt`` fits the window of each of ``tokenizers``: the worst one,
    and the identifier ``words`` present in the prompt but only past a window."""
    worst, cut = None, []
    for tokenizer in tokenizers:
        window = int(tokenizer.model_max_length)
        ids = _ids(tokenizer, prompt)
        kept = ids[:window - SPECIAL]
        for word in words:
            piece = _ids(tokenizer, word)
            if word not in cut and _holds(ids, piece) and not _holds(kept, piece):
                cut.append(word)
        over = len(ids) - (window - SPECIAL)
        if worst is None or over > worst[0]:
            worst = (over, len(ids), window)
    if worst is None:
        raise ValueError("fit() needs at least one tokenizer")
    return Fit(worst[1], worst[2], tuple(cut))


def cut_message(f: Fit, what: str) -> str:
    return (f"{what}: the identifier {' '.join(f.cut)!r} falls past the text encoder's "
            f"{f.window}-token window (the prompt holds {f.tokens + SPECIAL} tokens), so it is "
            f"never read; shorten the prompt or move the identifier to its start")


def truncated_message(f: Fit, what: str) -> str:
    said = f"{what}: the prompt is truncated at {f.window} tokens (it holds {f.tokens + SPECIAL}); " \
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

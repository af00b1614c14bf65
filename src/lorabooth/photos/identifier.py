"""Rare-token identifiers, as the DreamBooth paper picks them: short words
that the tokenizer keeps as one token, from the rare end of its vocabulary,
and that mean nothing in English."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from wordfreq import zipf_frequency

from ..config.templates import guess_identifier
from ..core.errors import UserError

# Zipf frequency (log10 of occurrences per billion words, wordfreq's English
# list): 3 is about one in a million words ("sks" is 2.3, "dog" 5.1). Below
# COMMON a word is not common English; below RARE it is all but unknown.
COMMON = 3.0
RARE = 1.5
MERGES = 49152 - 256 - 2  # CLIP's merge count
WORD = re.compile(r"^[a-z]{1,3}$")
END_OF_WORD = "</w>"


@dataclass(frozen=True)
class Candidate:
    token: str
    id: int
    merge_rank: int  # position of the merge that made it: later = rarer in the BPE corpus
    zipf: float

    @property
    def why(self) -> str:
        return (f"one token that round-trips; BPE merge #{self.merge_rank} of {MERGES} "
                f"(later = rarer); English zipf {self.zipf:.2f} (wordfreq; 0 = unseen)")


def _merge_ranks(tokenizer) -> dict[str, int]:
    """Whole-word token -> its merge rank. CLIP's vocabulary lists the 512 byte
    tokens first, then one token per merge in merge order, so id - 512 is the
    merge rank: a proxy for rarity in the text BPE was trained on."""
    vocab = tokenizer.get_vocab()
    base = 512
    return {tok[: -len(END_OF_WORD)]: i - base for tok, i in vocab.items()
            if tok.endswith(END_OF_WORD) and i >= base}


def single_token(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def candidates(tokenizer) -> list[Candidate]:
    """Every 1-3 lowercase letter whole-word token that encodes back to exactly
    itself and is not common English, rarest (latest merge) first."""
    found = []
    for word, rank in _merge_ranks(tokenizer).items():
        if not WORD.match(word):
            continue
        zipf = zipf_frequency(word, "en")
        if zipf >= RARE:
            continue
        token_id = single_token(tokenizer, word)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != word + END_OF_WORD:
            continue
        found.append(Candidate(word, token_id, rank, zipf))
    return sorted(found, key=lambda c: -c.merge_rank)


def rare_identifiers(tokenizer, n: int = 10, seed: int | None = None) -> list[Candidate]:
    """The ``n`` rarest candidates, or with ``seed`` ``n`` drawn at random from
    the rarest tenth (the paper samples from the rare range, not the one end)."""
    if n < 1:  # a negative n would slice from the end: all but the last -n rows
        raise UserError(f"--n: must be at least 1 (got {n})")
    pool = candidates(tokenizer)
    if seed is None:
        return pool[:n]
    rare = pool[: max(n, len(pool) // 10)]
    return sorted(random.Random(seed).sample(rare, min(n, len(rare))), key=lambda c: -c.merge_rank)


def render_table(rows: list[Candidate]) -> str:
    lines = [f"{'token':<6} {'id':>6}  why chosen"]
    lines += [f"{c.token:<6} {c.id:>6}  {c.why}" for c in rows]
    return "\n".join(lines)


def identifier_warnings(tokenizer, instance_prompt: str, class_prompt: str = "") -> list[str]:
    out = []
    for word in guess_identifier(instance_prompt, class_prompt):
        pieces = tokenizer.tokenize(word)
        if len(pieces) > 1:
            out.append(f"identifier {word!r} splits into {len(pieces)} tokens {pieces}; a single "
                       f"rare token learns faster (see `lorabooth identifier`)")
        zipf = zipf_frequency(word, "en")
        if zipf >= COMMON:
            out.append(f"identifier {word!r} is a common English word (zipf {zipf:.1f}); its "
                       f"meaning will leak into the subject (see `lorabooth identifier`)")
    return out


def check_prompt(prompt: str, tokenizer, class_prompt: str = "") -> tuple[str, list[str]]:
    """A per-word tokenisation table of ``prompt`` and the identifier warnings."""
    ident = set(guess_identifier(prompt, class_prompt))
    lines = [f"{'word':<14} {'tokens':<30} {'zipf':>5}  note"]
    for word in re.findall(r"[\w'-]+", prompt.lower()):
        pieces = tokenizer.tokenize(word)
        note = "identifier?" if word in ident else ""
        lines.append(f"{word:<14} {' '.join(pieces):<30} {zipf_frequency(word, 'en'):>5.1f}  {note}")
    return "\n".join(lines), identifier_warnings(tokenizer, prompt, class_prompt)

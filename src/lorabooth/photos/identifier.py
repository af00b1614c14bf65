"""Rare-token identifiers, as the DreamBooth paper picks them: short words
that the tokenizer keeps as one token, from the rare end of its vocabulary,
and that mean nothing in English.

Rarity is read from how the tokenizer was trained, whichever its kind:
CLIP's BPE (SD 1.x, SDXL, FLUX.1's CLIP) and Qwen's byte-level BPE (FLUX.2)
by the merge that made the word (later = rarer in the text BPE was trained
on); T5's unigram model (FLUX.1) by the piece's probability (lower = rarer)."""

from __future__ import annotations

import json
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
END_OF_WORD = "</w>"  # CLIP's mark of a word's last piece
SPACE_BPE = "\u0120"  # "Ġ": byte-level BPE's (GPT-2, Qwen) mark of a space before a word
SPACE_UNIGRAM = "\u2581"  # "▁": SentencePiece's (T5) mark of a space before a word


@dataclass(frozen=True)
class Candidate:
    token: str
    id: int
    merge_rank: int  # position of the merge (or piece) that made it: later = rarer
    zipf: float
    of: int = MERGES  # how many merges (pieces) the vocabulary has
    kind: str = "BPE merge"  # or "unigram piece" (ranked by probability)

    @property
    def why(self) -> str:
        return (f"one token that round-trips; {self.kind} #{self.merge_rank} of {self.of} "
                f"(later = rarer); English zipf {self.zipf:.2f} (wordfreq; 0 = unseen)")


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's whole-word tokens and their rarity: ``ranks`` maps a
    word to its rank (higher = rarer), ``spell`` a word to its token as the
    vocabulary writes it in a prompt (after a space)."""
    ranks: dict[str, int]
    of: int
    kind: str
    prefix: str = ""
    suffix: str = ""

    def spell(self, word: str) -> str:
        return self.prefix + word + self.suffix


def _model(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str())["model"] if backend is not None else {}


def vocabulary(tokenizer) -> Vocabulary:
    """The whole-word tokens of a CLIP, byte-level BPE or unigram tokenizer."""
    vocab = tokenizer.get_vocab()
    if any(tok.endswith(END_OF_WORD) for tok in vocab):
        # CLIP lists the 512 byte tokens first, then one token per merge in
        # merge order, so id - 512 is the merge rank
        base = 512
        return Vocabulary({tok[: -len(END_OF_WORD)]: i - base for tok, i in vocab.items()
                           if tok.endswith(END_OF_WORD) and i >= base}, MERGES, "BPE merge",
                          suffix=END_OF_WORD)
    model = _model(tokenizer)
    if model.get("type") == "Unigram":
        pieces = sorted((p for p in model["vocab"] if p[0].startswith(SPACE_UNIGRAM)),
                        key=lambda p: -p[1])  # most probable first
        return Vocabulary({p[0][1:]: rank for rank, p in enumerate(pieces) if p[0][1:]},
                          len(model["vocab"]), "unigram piece", prefix=SPACE_UNIGRAM)
    if model.get("type") == "BPE":
        merges = ["".join(m.split() if isinstance(m, str) else m) for m in model["merges"]]
        return Vocabulary({tok[1:]: rank for rank, tok in enumerate(merges)
                           if tok.startswith(SPACE_BPE) and len(tok) > 1}, len(merges),
                          "BPE merge", prefix=SPACE_BPE)
    raise UserError(f"{type(tokenizer).__name__}: not a CLIP, byte-level BPE or unigram "
                    f"tokenizer; lorabooth cannot rank its vocabulary")


def word_pieces(tokenizer, word: str) -> list[str]:
    """``word``'s tokens where an identifier stands: after another word and
    a space (byte-level BPE spells a word otherwise at the prompt's start)."""
    lead = tokenizer.tokenize("a")
    pieces = tokenizer.tokenize("a " + word)
    return pieces[len(lead):] if pieces[:len(lead)] == lead else tokenizer.tokenize(word)


def single_token(tokenizer, word: str) -> int | None:
    pieces = word_pieces(tokenizer, word)
    return tokenizer.convert_tokens_to_ids(pieces[0]) if len(pieces) == 1 else None


def candidates(tokenizer) -> list[Candidate]:
    """Every 1-3 lowercase letter whole-word token that encodes back to exactly
    itself and is not common English, rarest (latest merge) first."""
    vocab = vocabulary(tokenizer)
    found = []
    for word, rank in vocab.ranks.items():
        if not WORD.match(word):
            continue
        zipf = zipf_frequency(word, "en")
        if zipf >= RARE:
            continue
        token_id = single_token(tokenizer, word)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != vocab.spell(word):
            continue
        found.append(Candidate(word, token_id, rank, zipf, vocab.of, vocab.kind))
    return sorted(found, key=lambda c: -c.merge_rank)


def rare_identifiers(tokenizer, n: int = 10, seed: int | None = None) -> list[Candidate]:
    """The ``n`` rarest candidates, or with ``seed`` ``n`` drawn at random from
    the rarest tenth (the paper samples from the rare range, not the one end)."""
    if n < 1:  # a negative n would slice from the end: all but the last -n rows
        raise UserError(f"--n: must be at least 1 (got {n})")
    pool = candidates(tokenizer)
    if not pool:
        raise UserError(f"--model: {type(tokenizer).__name__}'s vocabulary holds no rare 1-3 "
                        f"letter word that is one token; pick a rare word and check it with "
                        f"--check")
    if seed is None:
        return pool[:n]
    rare = pool[: max(n, len(pool) // 10)]
    return sorted(random.Random(seed).sample(rare, min(n, len(rare))), key=lambda c: -c.merge_rank)


def render_table(rows: list[Candidate]) -> str:
    lines = [f"{'token':<6} {'id':>6}  why chosen"]
    lines += [f"{c.token:<6} {c.id:>6}  {c.why}" for c in rows]
    return "\n".join(lines)


def _tokenizers(tokenizer) -> list:
    return list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]


def identifier_warnings(tokenizer, instance_prompt: str, class_prompt: str = "") -> list[str]:
    """Warnings about the identifier of ``instance_prompt`` under a tokenizer
    (or each of a list: FLUX.1's CLIP and T5)."""
    out = []
    tokenizers = _tokenizers(tokenizer)
    for word in guess_identifier(instance_prompt, class_prompt):
        for t in tokenizers:
            pieces = word_pieces(t, word)
            if len(pieces) > 1:
                whose = f" by {type(t).__name__}" if len(tokenizers) > 1 else ""
                out.append(f"identifier {word!r} splits into {len(pieces)} tokens {pieces}{whose}; "
                           f"a single rare token learns faster (see `lorabooth identifier`)")
        zipf = zipf_frequency(word, "en")
        if zipf >= COMMON:
            out.append(f"identifier {word!r} is a common English word (zipf {zipf:.1f}); its "
                       f"meaning will leak into the subject (see `lorabooth identifier`)")
    return out


def check_prompt(prompt: str, tokenizer, class_prompt: str = "") -> tuple[str, list[str]]:
    """A per-word tokenisation table of ``prompt`` (one tokens column per
    tokenizer when given a list) and the identifier warnings."""
    tokenizers = _tokenizers(tokenizer)
    ident = set(guess_identifier(prompt, class_prompt))
    heads = ["tokens"] if len(tokenizers) == 1 else [f"tokens ({type(t).__name__})"
                                                     for t in tokenizers]
    lines = [f"{'word':<14} " + " ".join(f"{h:<30}" for h in heads) + f" {'zipf':>5}  note"]
    for word in re.findall(r"[\w'-]+", prompt.lower()):
        cells = " ".join(f"{' '.join(word_pieces(t, word)):<30}" for t in tokenizers)
        note = "identifier?" if word in ident else ""
        lines.append(f"{word:<14} {cells} {zipf_frequency(word, 'en'):>5.1f}  {note}")
    return "\n".join(lines), identifier_warnings(tokenizers, prompt, class_prompt)

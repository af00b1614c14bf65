"""The FLUX models' tokenizers for the built-in models, built offline from a
fixed text with the `tokenizers` library, deterministic (no download, no
sentencepiece): a small byte-level BPE as Qwen3's tokenizer class
(Qwen2TokenizerFast, with the chat template Flux2KleinPipeline applies) and
a small Unigram model from the text's word and character counts as T5's
(T5TokenizerFast). Real models bring their own
tokenizers; these give the same classes and code paths with a vocabulary of
a few hundred tokens."""

from __future__ import annotations

import json
from functools import lru_cache

# Prompts of the kind lorabooth reads and writes, so common words are single
# tokens and the BPE/Unigram learn English-like pieces.
FIXED_TEXT = """a photo of a dog. a photo of a sks dog on the beach. a sks cat in a bucket.
a red cube on a wooden table at sunset. a purple striped ball in the snow.
a picture of a person wearing a hat, in the style of a watercolor painting.
a backpack on a mountain, a vase with flowers, a teapot on a shelf, a toy car.
the quick brown fox jumps over the lazy dog near the river at night.
an oil painting of a castle, a pencil sketch of a cat, a cartoon of a robot.
a close up photo of a shoe on the grass with a blue sky in the background.
""".split("\n")

QWEN_VOCAB = 512
MAX_LENGTH = 512  # the window both FLUX pipelines read by default (max_sequence_length)

# Qwen3's chat template, cut to what Flux2KleinPipeline uses: user (and
# system) messages, the generation prompt, and thinking switched off by an
# empty <think></think> block (Qwen3's own template writes exactly this).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@lru_cache(maxsize=1)
def _bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    return train_byte_bpe(FIXED_TEXT, QWEN_VOCAB)


def train_byte_bpe(texts: list[str], vocab_size: int) -> tuple[dict[str, int],
                                                                tuple[tuple[str, str], ...]]:
    """A byte-level BPE's vocabulary and merges learnt from ``texts`` (at most
    ``vocab_size`` tokens; fewer when every word is already one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], tuple(tuple(m) for m in model["merges"])


def qwen_tokenizer(bpe: tuple[dict, tuple] | None = None):
    """A byte-level BPE tokenizer of Qwen's class (every byte has a token, so
    any prompt tokenises), with Qwen's special tokens and chat template;
    pads with <|endoftext|> on the right, as Qwen3's. ``bpe``: the
    vocabulary and merges (``train_byte_bpe``'s), else the fixed text's."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = bpe or _bpe()
    tokenizer = Qwen2TokenizerFast(vocab=dict(vocab), merges=list(merges),
                                   model_max_length=MAX_LENGTH)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


@lru_cache(maxsize=1)
def _unigram() -> tuple[tuple[str, float], ...]:
    """A Unigram vocabulary from the fixed text's counts: every word (with
    SentencePiece's "▁" for the space before it) and every character, each
    scored log(count / total), so known words are one piece and any other
    word splits into characters. Counted here because `tokenizers`'
    UnigramTrainer is not deterministic across processes (it visits pieces
    in hash order)."""
    import math
    from collections import Counter

    words = Counter("\u2581" + w for line in FIXED_TEXT for w in line.split())
    chars = Counter(c for line in FIXED_TEXT for c in line.replace(" ", "\u2581")) \
        + Counter({"\u2581": 1})
    counts = chars + words
    total = sum(counts.values())
    pieces = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return tuple(specials + [(p, math.log(n / total)) for p, n in pieces])


def t5_tokenizer():
    """A Unigram tokenizer of T5's class: <pad> 0, </s> 1, <unk> 2 as T5's,
    no sentinel tokens; unknown characters become <unk>."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(_unigram()), extra_ids=0, model_max_length=MAX_LENGTH)

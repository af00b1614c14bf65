"""Control characters shown, not obeyed: the one place that turns them into
visible escapes (``\\x1b``, ``\\u202e``), used for the terminal (printed
reports, log lines, error messages) and by markdown.py for the files we
write. A prompt or a downloaded LoRA's metadata holding ``ESC[31m``, a bell,
a carriage return or a right-to-left override can otherwise recolour the
terminal, overwrite the line before it or reverse the text a reader sees."""

from __future__ import annotations

import unicodedata

# Besides C0 (tab and newline too), DEL and C1: the characters that draw
# nothing but reorder or hide text (format characters: bidi embeddings,
# overrides and isolates, zero-width marks) and the Unicode line and
# paragraph separators.
_INVISIBLE = ("Cf", "Zl", "Zp")


def _shown(c: str) -> str:
    code = ord(c)
    if code < 0x20 or 0x7f <= code <= 0x9f or (
            code > 0x9f and unicodedata.category(c) in _INVISIBLE):
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return c


def visible(text: str) -> str:
    """``text`` with every control character as a visible escape; all other
    characters unchanged."""
    return "".join(map(_shown, str(text)))


def visible_lines(text: str) -> str:
    """Several lines for the terminal: each line made ``visible`` (a carriage
    return or escape inside it shown), the line breaks kept."""
    return "\n".join(visible(line) for line in str(text).split("\n"))

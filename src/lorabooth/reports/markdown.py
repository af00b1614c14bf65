"""User strings (prompts, paths, class nouns) placed into the markdown and
HTML files we write (model card, evaluation, sweep and tune reports), so
that they show as typed and cannot add markup, HTML or break out of a code
span or table; their control characters are shown as escapes
(visible.py)."""

from __future__ import annotations

import html
import re

from ..core.visible import visible, visible_lines

# CommonMark's backslash escapes for the punctuation that starts markup;
# < > & become entities instead, so that no HTML tag survives.
_MARKUP = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def one_line(text: str) -> str:
    """Newlines would end a table row or a heading: fold all white space."""
    return " ".join(text.split())


def text(value: str) -> str:
    """``value`` as plain text in a paragraph, heading or table cell."""
    return _MARKUP.sub(r"\\\1", html.escape(visible(one_line(value)), quote=False))


def _longest_backtick_run(value: str) -> int:
    return max((len(run) for run in re.findall(r"`+", value)), default=0)


def code(value: str) -> str:
    """``value`` as an inline code span: delimited by more backticks than
    any run inside it, padded when it starts or ends with one."""
    value = visible(one_line(value))
    ticks = "`" * (_longest_backtick_run(value) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{ticks}{pad}{value}{pad}{ticks}"


def fenced(body: str, lang: str = "") -> str:
    """A fenced code block that no line of ``body`` can close."""
    body = visible_lines(body)
    fence = "`" * max(3, _longest_backtick_run(body) + 1)
    return f"{fence}{lang}\n{body}\n{fence}"


def html_text(value: object, quote: bool = True) -> str:
    """``value`` as HTML text or attribute value (a ``<pre>`` keeps its lines)."""
    return html.escape(visible_lines(str(value)), quote=quote)

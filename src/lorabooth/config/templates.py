"""The user's templates: a caption (``{identifier}``, ``{class}``) and each
line of a prompts file (``{0}`` the identifier, ``{1}`` the class noun).

Only those placeholders are filled, and ``{{``/``}}`` stand for braces.
``str.format`` never sees user text: it would obey a width
(``{0:>99999999999}`` asks for a 100 GB string), attribute and index access
(``{0.__class__}``, ``{x[0]}``) and conversions, none of which a template
needs."""

from __future__ import annotations

import re

from ..core.errors import UserError
from ..core.fileio import MAX_TEXT_BYTES, read_text_file

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def fill_template(template: str, values: dict[str, str], where: str) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced; any other
    placeholder, or a lone brace, is one line naming ``where``."""
    def one(match: re.Match) -> str:
        token, name = match.group(0), match.group(1)
        if token in ("{{", "}}"):
            return token[0]
        if name is None:
            raise UserError(f"{where}: a lone {token!r} in {_short(template)}; "
                            f"write {token * 2} for a brace")
        if name not in values:
            known = ", ".join("{" + k + "}" for k in values)
            raise UserError(f"{where}: unknown placeholder {_short('{' + name + '}')} in "
                            f"{_short(template)}; only {known} (and {{{{ }}}} for braces)")
        return values[name]
    return _TOKEN.sub(one, template)


def prompt_templates(text: str, where: str) -> list[str]:
    """The non-empty lines of a prompts file, each checked to fill."""
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    if not templates:
        raise UserError(f"{where}: no prompts in the file")
    for i, t in enumerate(templates, 1):
        fill_template(t, {"0": "", "1": ""}, f"{where}: prompt {i}")
    return templates


def read_prompts_file(path: str) -> list[str]:
    """The templates of the user's ``--prompts`` file (read as every user file is)."""
    return prompt_templates(read_text_file(path, "--prompts", MAX_TEXT_BYTES), f"--prompts {path}")


def guess_identifier(instance_prompt: str, class_prompt: str = "") -> list[str]:
    """The words that make the instance prompt personal: those not in the class
    prompt ('a photo of sks dog' vs 'a photo of a dog' -> ['sks']); without a
    class prompt, the least frequent word."""
    from wordfreq import zipf_frequency

    words = re.findall(r"[\w'-]+", instance_prompt.lower())
    if class_prompt:
        common = set(re.findall(r"[\w'-]+", class_prompt.lower()))
        extra = [w for w in words if w not in common]
        if extra:
            return extra
    return [min(words, key=lambda w: zipf_frequency(w, "en"))] if words else []


def without_identifier(caption: str, identifier: list[str]) -> str:
    """The caption as the class would be captioned: the identifier's words
    removed, the class noun kept ('a photo of sks dog' -> 'a photo of dog';
    ai-toolkit's differential output preservation replaces the trigger word
    by the class word, which the DreamBooth prompt already holds)."""
    for word in identifier:
        caption = re.sub(rf"(?<![\w'-]){re.escape(word)}(?![\w'-])", "", caption,
                         flags=re.IGNORECASE)
    return " ".join(caption.split())

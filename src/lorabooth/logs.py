"""How lorabooth's processes log: its own lines on stderr, the libraries'
chatter off. Used by the command line and by `tune`'s worker processes."""

from __future__ import annotations

import logging
import os
import sys

from .visible import visible_lines


class VisibleText(logging.Filter):
    """Log lines quote prompts, paths and captions: their control characters
    reach the terminal as escapes. A filter on the handler sees every
    record (its message formatted once, here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = visible_lines(record.getMessage()), None
        return True


def quiet_libraries() -> None:
    # The libraries' own warnings are mostly noise for a user; what matters
    # among them (a LoRA loading only in part) lorabooth checks and reports
    # itself (formats.load_into_pipeline).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="lorabooth: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, VisibleText) for f in handler.filters):
            handler.addFilter(VisibleText())
    for name in ("accelerate", "diffusers", "transformers", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)

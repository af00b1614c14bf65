"""How lorabooth's processes log: its own lines on stderr, the libraries'
chatter off. Used by the command line and by `tune`'s worker processes."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

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
    # torchao and bitsandbytes (imported by peft and diffusers once installed)
    # name the CUDA kernels and the Triton they lack on every start
    for name in ("accelerate", "diffusers", "transformers", "peft", "httpx", "huggingface_hub",
                 "torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def diffusers_warnings_off() -> Iterator[None]:
    """diffusers' warnings off for a moment, whoever called (CLI, Python API,
    a worker): around loading a LoRA, where its "No LoRA keys associated to
    CLIPTextModel" on a UNet-only file is noise and a partial load is checked
    and reported by lorabooth itself (formats.layouts.load_into_pipeline)."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)

"""Control characters shown escaped (visible.py): in markdown and HTML
(markdown.py), on the terminal, in log lines and error messages, and in a
run's model card."""

import logging

from lorabooth.config import TrainConfig
from lorabooth.core.errors import UserError
from lorabooth.core.logs import VisibleText
from lorabooth.core.visible import visible, visible_lines
from lorabooth.reports import markdown as md
from lorabooth.training.runfiles import model_card

HOSTILE = "sks \x1b[31mRED\x07\r\x00\x9b\u202egnp.exe\u2066"
RAW = ("\x1b", "\x07", "\r", "\x00", "\x9b", "\u202e", "\u2066")


def clean(text: str) -> bool:
    return not any(c in text for c in RAW)


def test_visible_escapes_every_control_and_keeps_the_rest():
    assert visible(HOSTILE) == "sks \\x1b[31mRED\\x07\\x0d\\x00\\x9b\\u202egnp.exe\\u2066"
    assert visible("café 😀 a/b") == "café 😀 a/b"
    assert visible("a\nb\tc") == "a\\x0ab\\x09c"
    assert visible_lines("a\x1b\nb") == "a\\x1b\nb"


def test_markdown_and_html_quote_controls():
    for quoted in (md.text(HOSTILE), md.code(HOSTILE), md.fenced(HOSTILE + "\nline 2"),
                   md.html_text(HOSTILE)):
        assert clean(quoted), repr(quoted)
        assert "x1b" in quoted
    assert md.fenced("a\nb").count("\n") == 3  # the lines of a block are kept


def test_user_error_is_one_visible_line():
    e = UserError(f"--instance-dir {HOSTILE}\nsecond: no such folder")
    assert clean(str(e)) and "\n" not in str(e) and "\\x1b[31mRED" in str(e)


def test_log_lines_are_escaped():
    record = logging.LogRecord("lorabooth", logging.WARNING, __file__, 1, "%s: caption %s",
                               ("a\x1b[2Jb.txt", "x\ry"), None)
    assert VisibleText().filter(record)
    assert record.getMessage() == "a\\x1b[2Jb.txt: caption x\\x0dy"


def test_model_card_holds_no_raw_control_character():
    config = TrainConfig(instance_dir="p", instance_prompt=f"a photo of {HOSTILE} dog",
                         class_prompt=f"a photo of a {HOSTILE}", prior_preservation="images",
                         output=f"runs/{HOSTILE}", train_token=True)
    card = model_card(config, 64)
    assert clean(card), [c for c in RAW if c in card]
    assert "\\x1b" in card

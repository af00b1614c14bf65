"""Command line: parse -> config -> call one function. Nothing else here."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields

from .. import __version__
from ..config import build_config, field_default, field_kind, option_name
from ..config.checks import finite_float, finite_floats
from ..core.errors import UserError
from ..core.fileio import write_failure
from ..core.logs import quiet_libraries
from . import COMMANDS, run


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# Commands name their output folder or file --out or --output; each keeps
# its own spelling (the config field, the TOML key) and reads the other too.
ALIASES = {"out": "--output", "output": "--out"}


def _flags(cls: type, key: str) -> list[str]:
    """The option's name, and its other spelling where it has one that no
    other field of ``cls`` takes."""
    alias = ALIASES.get(key)
    taken = {f.name for f in fields(cls)}
    return [option_name(key)] + ([alias] if alias and alias[2:] not in taken else [])


def _add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per config field; its type, default and help come from
    there. Every default here is None so that only what the user typed
    overrides the --config file (and the dataclass's own default)."""
    for f in fields(cls):
        kind, many, _ = field_kind(cls, f.name)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+" if many else None, help=f.metadata["help"])
            continue
        help_text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help
        if "default" not in help_text:
            help_text += f" (default: {field_default(f)!r})"
        flags = _flags(cls, f.name)
        if len(flags) > 1:
            help_text += f" Also spelled {flags[1]}."
        name = {"dest": f.name, "default": None, "help": help_text}
        # a field's choices show as {a,b,c}; the config checks them (one message, exit 2)
        metavar = "{%s}" % ",".join(c or '""' for c in f.metadata["choices"]) \
            if "choices" in f.metadata else f.name.upper()
        if "flag_value" in f.metadata:  # --opt (the flag value), --opt VALUE, --no-opt ("off")
            parser.add_argument(option_name(f.name), nargs="?", const=f.metadata["flag_value"],
                                metavar=metavar, **name)
            parser.add_argument("--no-" + option_name(f.name)[2:], dest=f.name,
                                action="store_const", const="off", help=argparse.SUPPRESS)
        elif kind is bool:
            parser.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, **name)
        elif many and kind is str:
            parser.add_argument(*flags, action="append", metavar=f.name.upper(), **name)
        else:
            parse = finite_floats if many else finite_float if kind is float else kind
            parser.add_argument(*flags, type=parse, metavar=metavar, **name)
    parser.add_argument("--config", metavar="FILE.toml",
                        help="TOML file of these options (keys: option names with _); "
                             "command-line options override it")


def build_parser() -> argparse.ArgumentParser:
    """Every command and option from the config tree (commands.COMMANDS)."""
    parser = _Parser(prog="lorabooth", description="DreamBooth LoRA: train, draw, measure.")
    parser.add_argument("--version", action="version", version=f"lorabooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (cls, help_text, _) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(
                dest="subcommand", required=True, parser_class=_Parser)
        command = (groups[group] if group else sub).add_parser(leaf, help=help_text)
        _add_options(command, cls)
        command.set_defaults(config_class=cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad option (2, already printed)
        return int(e.code or 0)
    quiet_libraries()
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write fails (EFBIG) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cls = args.config_class
        overrides = {f.name: getattr(args, f.name) for f in fields(cls)}
        run(build_config(cls, args.config, overrides))  # heavy imports only in here
        return 0
    except UserError as e:
        print(f"lorabooth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorabooth {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk, a size limit, a read-only folder: one line too
        failure = write_failure(e)
        if failure is None:
            raise
        print(f"lorabooth {args.command}: error: {failure}", file=sys.stderr)
        return 2

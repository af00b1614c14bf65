"""What each command reads and writes, declared in one table (``PLANS``)
that ``commands.run`` checks through ``guard.check`` before the command
runs. A command without an entry here does not run (``commands.run``
raises), and ``tests/test_guard.py`` builds every command's config and checks
that each of its path options is declared."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from .guard import Plan, Read, Write, check


def _lora_input(option: str, path: str) -> Read:
    """A run folder or a LoRA file."""
    return Read(option, path, "run" if Path(path).is_dir() else "file")


def _model(c: Any) -> tuple[Read, ...]:
    """--model: a local folder or file is an input; a hub id is not a path."""
    return (Read("--model", c.model),) if c.model else ()


def _train(c: Any) -> Plan:
    reads = [Read("--instance-dir", c.instance_dir, "photos"), *_model(c)]
    if c.model_config:
        reads.append(Read("--model-config", c.model_config))
    writes = [Write("--output", c.output, "folder", "train")]
    if c.prior_images:  # class images are drawn into it when it holds too few
        writes.append(Write("--class-dir", str(c.class_path), "folder", "class-images"))
    elif c.class_dir:  # unused without --prior-preservation images
        reads.append(Read("--class-dir", c.class_dir))
    return Plan(tuple(reads), tuple(writes))


def _generate(c: Any) -> Plan:
    out = c.out_folder
    return Plan((_lora_input("RUN", c.run), *_model(c)),
                (Write("--output", out, "folder", "generate"),))


def _evaluate(c: Any) -> Plan:
    out = c.out or str(Path(c.run) / "eval")
    reads = (_lora_input("RUN", c.run), Read("--real", c.real, "photos"),
             Read("--prompts", c.prompts), *_model(c))
    return Plan(reads, (Write("--out", out, "folder", "evaluate"),))


def _prepare(c: Any) -> Plan:
    return Plan((Read("SRC", c.src, "photos"), *_model(c)),
                (Write("OUT", c.out, "folder", "prepare"),))


def _inspect(c: Any) -> Plan:
    return Plan((Read("FILE", c.file), *_model(c)))


def _convert(c: Any) -> Plan:
    dst = Path(c.dst)
    if dst.is_dir():  # a folder takes the layout's own file name
        dst = dst / (KOHYA_WEIGHT_NAME if c.to == "kohya" else WEIGHT_NAME)
    return Plan((Read("SRC", c.src),), (Write("DST", str(dst), "file", "convert"),),
                overwrite=c.overwrite)


def _merge(c: Any) -> Plan:
    return Plan(tuple(_lora_input("LORAS", p) for p in c.loras),
                (Write("--out", c.out, "file", "merge"),), overwrite=c.overwrite)


def _fuse(c: Any) -> Plan:
    out = Write("--out", c.out, "file", "fuse") if c.single_file else \
        Write("--out", c.out, "folder", "fuse")
    return Plan((_lora_input("RUN", c.run), *_model(c)), (out,), overwrite=c.overwrite)


def _sweep(c: Any) -> Plan:
    from ..search.sweep import load_sweep

    check(Plan((Read("FILE", c.file),)))  # a regular file before it is parsed
    sweep = load_sweep(c.file)
    reads = [Read("FILE", c.file), Read("instance_dir", sweep.base.get("instance_dir", ""),
                                        "photos")]
    if sweep.evaluate:
        reads += [Read("[evaluate] real", sweep.evaluate.real, "photos"),
                  Read("[evaluate] prompts", sweep.evaluate.prompts)]
    return Plan(tuple(reads), (Write("output", str(sweep.output), "folder", "sweep"),))


def _tune(c: Any) -> Plan:
    reads = (Read("PHOTOS", c.photos, "photos"), Read("--space", c.space),
             Read("--prompts", c.prompts), *_model(c))
    return Plan(reads, (Write("--out", c.out, "folder", "tune"),))


def _ui(c: Any) -> Plan:
    return Plan(_model(c), (Write("--workspace", c.workspace, "folder", "ui"),))


def _demo(c: Any) -> Plan:
    return Plan((), (Write("--output", c.output, "folder", "demo"),))


def _pretrain(c: Any) -> Plan:
    return Plan((Read("--reuse", c.reuse), Read("--init", c.init)),
                (Write("--out", c.out, "folder", "pretrain"),))


def _flow_pretrain(c: Any) -> Plan:
    return Plan((Read("--judges-from", c.judges_from), Read("--init", c.init)),
                (Write("--out", c.out, "folder", "pretrain"),))


def _research(owner: str) -> Callable[[Any], Plan]:
    """The toy world's studies: runs under OUT, and the report in docs/
    that each run of the study rewrites by design."""
    def plan(c: Any) -> Plan:
        return Plan((), (Write("--out", c.out, "folder", owner),
                         Write("--report", c.report, "report", owner)))
    return plan


PLANS: dict[str, Callable[[Any], Plan]] = {
    "train": _train,
    "generate": _generate,
    "prepare": _prepare,
    "identifier": lambda c: Plan(_model(c)),  # reads the tokenizer, writes nothing
    "evaluate": _evaluate,
    "toyworld pretrain": _pretrain,
    "toyworld flow-pretrain": _flow_pretrain,
    "toyworld claims": _research("claims"),
    "toyworld tune-study": _research("tune-study"),
    "convert": _convert,
    "inspect": _inspect,
    "merge": _merge,
    "fuse": _fuse,
    "sweep": _sweep,
    "tune": _tune,
    "demo": _demo,
    "ui": _ui,
}

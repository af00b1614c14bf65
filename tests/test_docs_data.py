"""Every aggregate figure in docs/ and the README's settings table is what a
named command makes from per-seed data committed beside it: each page's
tables are rendered again here from their data files, and every figure of
the form `mean [min–max]` or `[95% CI lo, hi]` on a page must be one the
renderers produce."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from lorabooth.toyworld import calibrated_report as report

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SPREAD = re.compile(r"-?\d+\.\d{3} \[-?\d+\.\d{2}–-?\d+\.\d{2}\]")
INTERVAL = re.compile(r"[+-]\d+\.\d{3} \[95% CI [+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]")


def _script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _json(relative: str) -> dict:
    return json.loads((DOCS / relative).read_text())


def _figures(text: str) -> set[str]:
    return set(SPREAD.findall(text)) | set(INTERVAL.findall(text))


@pytest.fixture(scope="module")
def calibrated():
    return _script(ROOT / "benchmarks" / "calibrated_world.py")


@pytest.fixture(scope="module")
def remade():
    return _script(ROOT / "scripts" / "verdicts_from_figures.py")


def test_the_calibrated_page_is_its_data_rendered(calibrated):
    """docs/toyworld/calibrated.md == `calibrated_world.py report` on the
    committed fit, subject and lever records."""
    assert (DOCS / "toyworld" / "calibrated.md").read_text() == calibrated.render()


def test_the_calibration_pages_tables_are_their_data_rendered():
    page = (DOCS / "calibration.md").read_text()
    subjects = _json("toyworld/subjects.json")
    tables = [report.twin_table(_json("toyworld/instance_judge.json")),
              report.distance_table(_json("calibration/salience_distance.json")),
              report.targets_table(),
              report.fit_table(_json("calibration/fit.json")).split("\n\n")[0],
              report.kept_table(subjects["records"], subjects["base"])]
    for table in tables:
        assert table.strip() in page, table
    assert _figures(page) <= _figures((DOCS / "toyworld" / "calibrated.md").read_text())


def test_the_uncalibrated_worlds_page_shows_only_figures_with_committed_seeds(remade):
    page = (DOCS / "toyworld.md").read_text()
    rendered = "\n".join(remade.settings_table() + remade.toyworld())
    for line in remade.settings_table():
        assert line in page, line
    assert _figures(page) <= _figures(rendered), _figures(page) - _figures(rendered)


def test_the_tune_pages_verdicts_are_its_figures_points(remade):
    page = (DOCS / "tune.md").read_text()
    for line in remade.tune():
        assert line.rstrip(".") in page, line


def _settings_table(readme: str) -> str:
    start = readme.index("### Which settings")
    return readme[start:readme.index("\n\n", readme.index("| setting |", start))]


def test_the_readmes_recommendations_quote_the_calibrated_tables():
    """Every figure in the README's settings table is one of the calibrated
    world's tables (themselves rendered from data above)."""
    table = _settings_table((ROOT / "README.md").read_text())
    source = (DOCS / "toyworld" / "calibrated.md").read_text()
    quoted = _figures(table)
    assert quoted, "the settings table quotes no measured figure"
    assert quoted <= _figures(source), quoted - _figures(source)


@pytest.mark.parametrize("script, data, render", [
    ("build_factor", "build_factor.json", lambda m, d: m.table(d["runs"], list(d["summary"]))),
    ("train_speed", "train_speed.json", lambda m, d: m.table(
        d["runs"], None, json.loads((ROOT / "benchmarks" / "data" / "build_factor.json")
                                    .read_text())["summary"])),
    ("class_images", "class_images.json", lambda m, d: m.table(d["runs"])),
    ("craft_check", "craft_check_sd15.json", lambda m, d: m.report(d).splitlines()),
    ("craft_check", "craft_check_sd15_lycoris.json", lambda m, d: m.report(d).splitlines()),
    ("craft_check", "craft_check_sdxl.json", lambda m, d: m.report(d).splitlines()),
    ("craft_check", "craft_check_schedules.json", lambda m, d: m.report(d).splitlines()),
    *[("memory_table", f"memory_table/{name}.json", lambda m, d: m.table(d).splitlines()[1:])
      for name in ("sd15_512_cpu", "sdxl_512_cpu", "sdxl_1024_cpu", "klein_512_cpu",
                   "flux1_512_cpu", "klein_1024_cpu")],
])
def test_the_benchmark_tables_are_their_data_rendered(script, data, render):
    """benchmarks/RESULTS.md's like-for-like tables are what each script
    prints from the raw data committed in benchmarks/data/."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        module = _script(ROOT / "benchmarks" / f"{script}.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    table = "\n".join(line for line in render(module, json.loads(
        (ROOT / "benchmarks" / "data" / data).read_text())) if line)
    assert table in (ROOT / "benchmarks" / "RESULTS.md").read_text(), table


README_MEMORY_ROWS = {"SDXL": "sdxl-random", "FLUX.2 [klein]": "flux2-klein-random",
                      "FLUX.1 [dev]": "flux-random"}


def test_the_readmes_memory_figures_are_measured_rows():
    """Each GB figure of the README's table of quantised-base peaks is the
    peak RSS of the checkpointed row of its model, size and precision in the
    memory tables' raw data."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| model, size | bf16 | int8 | nf4 |")
    table = readme[start:readme.index("\n\n", start)].splitlines()[2:]
    measured = {}
    for path in (ROOT / "benchmarks" / "data" / "memory_table").glob("*.json"):
        for r in json.loads(path.read_text())["runs"]:
            if r.get("gradient_checkpointing") and not r.get("blocks_to_swap") and "error" not in r:
                key = (r["model"], r["resolution"], r["precision"])
                measured[key] = f"{r['peak_rss_gb']:.2f} GB"  # as the tables print it
    quoted = 0
    for line in table:
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        model, px = name.rsplit(", ", 1)
        for precision, cell in zip(("bf16", "int8", "nf4"), cells):
            if cell.endswith(" GB"):
                key = (README_MEMORY_ROWS[model], int(px.removesuffix(" px")), precision)
                assert measured.get(key) == cell, (key, cell, measured.get(key))
                quoted += 1
    assert quoted == 13

"""examples/lorabooth.ipynb: stored without outputs, and run top to bottom (as
a user runs it, on the toy model) in a Jupyter kernel started from this
Python, so a fresh clone's .venv runs it with nothing registered."""

import json
import re
import sys
from base64 import b64decode
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "lorabooth.ipynb"
KERNEL = "lorabooth-test"
QUICK = "STEPS, SAMPLER_STEPS = 30, 8"


def _read():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _cell(nb, text: str):
    """The one code cell whose source holds ``text``."""
    found = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(found) == 1, (text, len(found))
    return found[0]


def test_the_committed_notebook_has_no_outputs():
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [] and c.execution_count is None, c.source[:60]
    assert "widgets" not in nb.metadata


def test_the_first_code_cell_alone_switches_to_stable_diffusion():
    """Uncommenting one MODEL line in the settings cell moves everything that
    depends on the model."""
    source = _cell(_read(), 'MODEL = "toy"').source
    assert [c for c in _read().cells if c.cell_type == "code"][0].source == source
    toy: dict = {}
    exec(source, toy)
    assert (toy["TOY"], toy["RESOLUTION"]) == (True, 32)
    # model -> (resolution, the family's guidance, whether the text encoder trains)
    expected = {"runwayml/stable-diffusion-v1-5": (512, 7.5, True),
                "stabilityai/stable-diffusion-xl-base-1.0": (1024, 7.5, True),
                "black-forest-labs/FLUX.2-klein-4B": (1024, 4.0, False),
                "black-forest-labs/FLUX.1-dev": (1024, 3.5, False)}
    for model, (resolution, guidance, text) in expected.items():
        line = f'# MODEL = "{model}"'
        assert line in source, line
        values: dict = {}
        exec(source.replace(line, line[2:]), values)
        assert (values["MODEL"], values["TOY"], values["RESOLUTION"]) == (model, False, resolution)
        assert (values["GUIDANCE"], values["TRAIN_TEXT_ENCODER"]) == (guidance, text)
        assert values["STEPS"] != toy["STEPS"] and values["LR"] != toy["LR"]


def _kernel_of_this_python(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts this interpreter (the venv's), visible only
    through JUPYTER_PATH; the kernel inherits this environment (PYTHONPATH,
    HF_HUB_OFFLINE)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lorabooth tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the progress bar is part of the check
    return KERNEL


def _outputs(cell, kind: str) -> list[str]:
    """``kind`` (a MIME type, or "stderr"/"stdout") of every output of a cell."""
    if kind in ("stderr", "stdout"):
        return [o.text for o in cell.outputs if o.output_type == "stream" and o.name == kind]
    return [o.data[kind] for o in cell.outputs if kind in o.get("data", {})]


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    nb = _read()
    # every cell as stored, after a parameters cell (as papermill injects one)
    # that shortens the toy run: the same calls and outputs, in a fifth of the
    # time (the notebook's own 150 steps take minutes on a 2-core machine)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(QUICK))
    # no limit on a cell's time (a loaded machine is slow, not broken); the
    # start-up limit only guards against a kernel that never comes up
    NotebookClient(nb, kernel_name=_kernel_of_this_python(tmp_path, monkeypatch), timeout=None,
                   startup_timeout=3600, resources={"metadata": {"path": str(work)}}).execute()
    run = work / "runs" / "notebook"

    prepared = _cell(nb, "lorabooth.prepare(")
    assert "".join(_outputs(prepared, "stdout")).count("kept ") == 4  # the toy world's 4 pictures
    assert _outputs(prepared, "image/png")

    trained = _cell(nb, "lorabooth.train(")
    steps = len((run / "metrics.jsonl").read_text().splitlines())
    assert steps == 30  # the parameters cell was read
    bar = "".join(_outputs(trained, "stderr"))
    assert re.search(rf"train: 100%.*{steps}/{steps}", bar), bar[-500:]
    assert "<svg" in _outputs(trained, "text/html")[0]

    # each prompt's grid shown inline is the grid.png generate wrote
    shown = [b64decode(png) for png in _outputs(_cell(nb, "lorabooth.generate("), "image/png")]
    grids = sorted((run / "generated").glob("*/grid.png"))
    assert len(grids) == 2 and shown == [g.read_bytes() for g in grids]

    # the evaluation table shown is the run's, with its figures
    table = _outputs(_cell(nb, "lorabooth.evaluate("), "text/markdown")[0]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["rows"]) == {"base model (no LoRA)", "lorabooth", "real images"}
    dino = metrics["rows"]["lorabooth"]["dino"]["mean"]
    assert re.search(rf"^\| lorabooth \| {dino:.3f}", table, re.M), table
    assert "toy identity judge" in table

"""The wheel a user installs holds everything the package reads at run time
(the toy model, the tokenizer vocabulary, the prompt lists, the demo photos):
built, installed outside the checkout, and run from there."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with only the lorabooth wheel in it; the
    dependencies come from the test environment (a .pth line), so torch is
    not installed twice."""
    tmp = tmp_path_factory.mktemp("wheel")
    # a clean copy of what a source release holds: no build/ or egg-info
    # left over from an editable install can fill in missing package data
    tree = tmp / "tree"
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(tree)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("lorabooth-*.whl"))
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # after the new environment's own site-packages, so the wheel wins over
    # the checkout's editable install
    Path(site, "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "-q", str(wheel)], check=True, cwd=tmp)
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(env_dir / "bin" / "python"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_installed_wheel_runs_version_and_demo(installed, tmp_path):
    where = _run(installed, "-c", "import lorabooth; print(lorabooth.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout  # not the checkout
    version = _run(installed, "-m", "lorabooth", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("lorabooth "), version
    demo = _run(installed, "-m", "lorabooth", "demo", "--output", str(tmp_path / "demo"),
                "--steps", "4", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "demo" / "pytorch_lora_weights.safetensors").is_file()
    prompts = _run(installed, "-c", "from lorabooth.evaluation.runner import load_prompts; "
                   "print(len(load_prompts('object', None, 'sks', 'toy')))", cwd=tmp_path)
    assert prompts.returncode == 0 and int(prompts.stdout) == 25, prompts.stderr[-2000:]

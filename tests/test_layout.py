"""The package's shape: importing it loads no torch, the CLI answers --help
and a bad option without it, and no two modules import each other (directly
or round a longer loop), counting imports inside functions too."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorabooth"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name and t != "lorabooth"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)


def test_importing_the_package_loads_no_torch():
    r = _fresh_python("import sys, lorabooth\n"
                      "from lorabooth import TrainConfig, UserError\n"
                      "assert lorabooth.__version__\n"
                      "print(sorted(m for m in ('torch', 'diffusers', 'transformers') "
                      "if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_cli_answers_help_and_bad_options_without_torch():
    r = _fresh_python(
        "import sys, contextlib, io\n"
        "from lorabooth.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0 and main(['train', '--help']) == 0\n"
        "assert main(['train', '--instance-dir', 'x', '--instance-prompt', 'a', '--lr', 'nan']) == 2\n"
        "assert main(['generate', 'run', '--prompt', 'x', '--unet-scale', '1,nan']) == 2\n"
        "print('torch' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "False", (r.stdout, r.stderr)
    assert "--lr" in r.stderr


def test_api_names_resolve():
    import lorabooth

    assert callable(lorabooth.train) and callable(lorabooth.generate)
    assert callable(lorabooth.evaluate) and lorabooth.TrainConfig.__name__ == "TrainConfig"


# The product's layers (training, generation, evaluation, search, formats,
# models) never reach the research code; only the command dispatch and the
# demo import lorabooth.toyworld.
PRODUCT = ("lorabooth.training", "lorabooth.drawing", "lorabooth.evaluation", "lorabooth.sweep",
           "lorabooth.sweep_report", "lorabooth.tune", "lorabooth.formats", "lorabooth.models")
TOYWORLD_IMPORTERS = {"lorabooth.commands", "lorabooth.demo"}


def _is_toyworld(module: str) -> bool:
    return module == "lorabooth.toyworld" or module.startswith("lorabooth.toyworld.")


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_only_dispatch_and_demo_import_toyworld():
    graph = import_graph()
    importers = {m for m, deps in graph.items()
                 if not _is_toyworld(m) and any(_is_toyworld(d) for d in deps)}
    assert importers <= TOYWORLD_IMPORTERS, importers - TOYWORLD_IMPORTERS
    product = [m for m in graph if m.startswith(PRODUCT)]
    assert "lorabooth.tune_report" in product and "lorabooth.formats.clients" in product
    reaching = {m for m in product if any(_is_toyworld(d) for d in _reach(graph, m))}
    assert not reaching, sorted(reaching)

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
        "from lorabooth.commands.cli import main\n"
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


# The layers, bottom up (ARCHITECTURE.md): a module imports only from its own
# layer or the ones below. The research code (toyworld) may import any
# product layer; of the product only the dispatch and the demo import it.
LAYERS = (
    ("core",),
    ("config",),
    ("formats", "reports"),  # formats: names, key maps, single-file layouts (pure)
    ("models", "photos"),
    ("adapters",),
    # formats' file operations (convert, inspect, merge and fuse, the clients'
    # load checks) work on adapters and models, so they sit with training
    ("training", "generation", "evaluation",
     "formats.layouts", "formats.inspection", "formats.merging", "formats.clients"),
    ("search",),
    ("commands", "demo", "ui"),
)
RESEARCH = "toyworld"
TOYWORLD_IMPORTERS = {"lorabooth.commands", "lorabooth.demo"}


def layer_of(module: str) -> int | None:
    """The layer of ``lorabooth.X.Y...`` by the longest entry of LAYERS it
    starts with (None: the package's own __init__/__main__, or the research
    code)."""
    name = module.partition(".")[2]
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and (
                    best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best[0] if best else None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() for d in deps
                  if layer_of(m) is not None and layer_of(d) is not None
                  and layer_of(d) > layer_of(m))


def test_every_module_has_a_layer():
    top = {m.split(".")[1] for m in import_graph() if m.count(".") >= 1}
    unplaced = {t for t in top if t not in ("__main__", RESEARCH) and layer_of(f"lorabooth.{t}") is None}
    assert not unplaced, f"add these to LAYERS: {sorted(unplaced)}"


def test_no_import_points_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_an_upward_import_is_caught():
    graph = {"lorabooth.core.fileio": {"lorabooth.training.loop"}, "lorabooth.training.loop": set()}
    assert upward_imports(graph) == [("lorabooth.core.fileio", "lorabooth.training.loop")]


def _is_toyworld(module: str) -> bool:
    return module == f"lorabooth.{RESEARCH}" or module.startswith(f"lorabooth.{RESEARCH}.")


def test_only_dispatch_and_demo_import_toyworld():
    graph = import_graph()
    importers = {m for m, deps in graph.items()
                 if not _is_toyworld(m) and any(_is_toyworld(d) for d in deps)}
    assert importers <= TOYWORLD_IMPORTERS, importers - TOYWORLD_IMPORTERS


def test_architecture_lists_every_module():
    """ARCHITECTURE.md's module list names every file of the package, so a
    new module is placed (and said) where a maintainer will look."""
    listed = (PACKAGE.parents[1] / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if f"`{p.relative_to(PACKAGE)}`" not in listed]
    assert not missing, f"add to ARCHITECTURE.md's module list: {missing}"

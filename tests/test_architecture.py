"""The package's shape: imports flow one way, down the layers of DESIGN.md.

Run ``python tests/test_architecture.py`` to print the import graph, layer by layer.
Every import counts, including those inside functions (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out, because they never
run.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minilora"

LAYERS = [
    "version",
    "checks",
    "backend",
    "blas",
    "layers",
    "lora",
    "model",
    "adapters",
    "params",
    "io",
    "runfolder",
    "data",
    "checkpoints",
    "planted",
    "optim",
    "train",
    "sweep",
    "gradcheck",
    "gradcheck_report",
    "torch_reference",
    "bench",
    "bench_report",
    "experiments",
    "figures",
    "demo",
    "commands",
    "cli",
    "__init__",
    "__main__",
]
"""Every module, in import order: a module may import only modules above it."""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every minilora import that can run."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minilora"):
            names = [a.name for a in node.names]
            if node.module == "minilora":  # from minilora import checkpoints, __version__
                for n in names:
                    is_module = (PACKAGE / f"{n}.py").exists()
                    found.append((f"minilora.{n}", []) if is_module else ("minilora", [n]))
            else:
                found.append((node.module, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("minilora")]
        found += _imports(node)
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """module -> {imported module -> names imported from it}, within the package."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        edges: dict[str, list[str]] = {}
        for module, names in _imports(ast.parse(path.read_text())):
            short = module.removeprefix("minilora.").removeprefix("minilora")
            short = short or "__init__"
            if short != path.stem:
                edges.setdefault(short, []).extend(names)
        graph[path.stem] = edges
    return graph


def test_every_module_has_a_layer():
    assert sorted(import_graph()) == sorted(LAYERS)


def test_imports_flow_down_the_layers():
    """No module imports one below it, so there is no circle, lazy imports included."""
    upward = [
        f"{module} imports {target}"
        for module, edges in import_graph().items()
        for target in edges
        if LAYERS.index(target) >= LAYERS.index(module)
    ]
    assert not upward, upward


def test_no_module_imports_private_names():
    private = [
        f"{module} imports {target}.{name}"
        for module, edges in import_graph().items()
        for target, names in edges.items()
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert not private, private


def test_the_readme_lists_the_modules_in_import_order():
    """The package map a reader sees is the order this test enforces."""
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| layer | module |") :].split("\n\n")[0]
    listed = re.findall(r"`(\w+)\.py`", table)
    assert listed == [m for m in LAYERS if not m.startswith("__")]


def test_the_checker_finds_a_circle(tmp_path, monkeypatch):
    """The graph test can fail: a lazy import from a lower module is an upward edge."""
    monkeypatch.setattr("test_architecture.PACKAGE", tmp_path)
    (tmp_path / "lora.py").write_text("def f():\n    from minilora.model import GPT\n")
    (tmp_path / "model.py").write_text("from minilora.lora import f\n")
    graph = import_graph()
    assert graph == {"lora": {"model": ["GPT"]}, "model": {"lora": ["f"]}}


if __name__ == "__main__":
    for module in LAYERS:
        edges = import_graph().get(module, {})
        print(f"{module:18} <- {', '.join(sorted(edges, key=LAYERS.index)) or '(nothing)'}")

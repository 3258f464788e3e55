"""The package's shape: imports flow one way, down the subpackages, then down the modules.

Run ``python tests/test_architecture.py`` to print the import graph, module by module.
Every import counts, including those inside functions (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out, because they never
run. docs/DESIGN.md, "The package", explains the rooms.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minilora"

SUBPACKAGES = {
    "basics": ["version", "checks", "backend", "parallel", "blas"],
    "core": [
        "layers",
        "dora",
        "vera",
        "lora",
        "quant",
        "model",
        "adapters",
        "optim",
        "gradcheck",
        "params",
        "qlora",
        "tokenizer",
    ],
    "files": ["io", "gpt2", "peft", "checkpoints"],
    "training": ["batches", "textfile", "data", "planted", "runfolder", "schedule", "train"],
    "lab": [
        "sweep",
        "gradcheck_report",
        "torch_reference",
        "reference",
        "timing",
        "machine",
        "busy_core",
        "flops",
        "memory",
        "op_profile",
        "bench",
        "bench_report",
        "runs",
        "experiments",
        "plots",
        "update_plots",
        "variants",
        "figures",
        "claims",
        "claim_plots",
        "claims_report",
        "exercises.grader",  # lab/exercises/, a package inside the lab: its modules,
        "exercises.one_layer",  # then its __init__, all before the lab's own __init__
        "exercises.whole_model",
        "exercises.many_adapters",
        "exercises.file_format",
        "exercises.family",
        "exercises.quantization",
        "exercises.gpt2_layout",
        "exercises.__init__",
    ],
    "cli": ["demo", "lab_commands", "commands", "main"],
}
"""Subpackages in import order, each with its modules in import order. A package
nested in a subpackage lists its modules as "package.module", then "package.__init__"."""

LAYERS = [
    *(f"{pkg}.{m}" for pkg, modules in SUBPACKAGES.items() for m in [*modules, "__init__"]),
    "__init__",
    "__main__",
]
"""Every module, in import order: a module may import only modules above it. A
subpackage's ``__init__`` comes after its modules; the package's own comes last."""

READING_ORDER = [f"core.{m}" for m in SUBPACKAGES["core"]]
"""The files a learner reads first: the README's package map starts with them."""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_of(dotted: str) -> str:
    """ "minilora.core.lora" -> "core.lora"; "minilora.core" -> "core.__init__"."""
    rel = dotted.removeprefix("minilora").removeprefix(".")
    if not rel:
        return "__init__"
    return rel if (PACKAGE / f"{rel.replace('.', '/')}.py").exists() else f"{rel}.__init__"


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every minilora import that can run."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minilora"):
            folder = PACKAGE.joinpath(*node.module.split(".")[1:])
            for alias in node.names:  # from minilora.core import lora: the module lora
                nested = (folder / alias.name / "__init__.py").exists()  # a nested package
                if (folder / f"{alias.name}.py").exists() or nested:
                    found.append((_module_of(f"{node.module}.{alias.name}"), []))
                else:
                    found.append((_module_of(node.module), [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(_module_of(a.name), []) for a in node.names if a.name.startswith("minilora")]
        found += _imports(node)
    return found


def _name(path: Path, package: Path) -> str:
    return ".".join(path.relative_to(package).with_suffix("").parts)


def import_graph() -> dict[str, dict[str, list[str]]]:
    """module -> {imported module -> names imported from it}, within the package."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _name(path, PACKAGE)
        edges: dict[str, list[str]] = {}
        for module, names in _imports(ast.parse(path.read_text())):
            if module != me:
                edges.setdefault(module, []).extend(names)
        graph[me] = edges
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


def test_the_readme_maps_every_module_reading_order_first():
    """The package map starts with the core in reading order, then lists every other module."""
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| room | module |") :].split("\n\n")[0]
    listed = [p.replace("/", ".") for p in re.findall(r"`([\w/]+)\.py`", table)]
    assert listed[: len(READING_ORDER)] == READING_ORDER
    assert sorted(listed) == sorted(m for m in LAYERS if not m.endswith(("__init__", "__main__")))
    assert len(listed) == len(set(listed))


def test_the_checker_finds_a_circle(tmp_path, monkeypatch):
    """The graph test can fail: a lazy import from a lower module is an upward edge."""
    monkeypatch.setattr("test_architecture.PACKAGE", tmp_path)
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "lora.py").write_text(
        "def f():\n    from minilora.core.model import GPT\n"
    )
    (tmp_path / "core" / "model.py").write_text("from minilora.core import lora\n")
    graph = import_graph()
    assert graph == {"core.lora": {"core.model": ["GPT"]}, "core.model": {"core.lora": []}}


def test_the_checker_sees_a_nested_package(tmp_path, monkeypatch):
    """``from minilora.lab import exercises`` imports the package lab/exercises/, not a
    name of lab/__init__.py: the edge goes to lab.exercises.__init__."""
    monkeypatch.setattr("test_architecture.PACKAGE", tmp_path)
    (tmp_path / "lab" / "exercises").mkdir(parents=True)
    (tmp_path / "lab" / "__init__.py").write_text("")
    (tmp_path / "lab" / "exercises" / "__init__.py").write_text("")
    (tmp_path / "__init__.py").write_text("from minilora.lab import exercises\n")
    assert import_graph()["__init__"] == {"lab.exercises.__init__": []}


if __name__ == "__main__":
    graph = import_graph()
    for module in LAYERS:
        edges = graph.get(module, {})
        print(f"{module:26} <- {', '.join(sorted(edges, key=LAYERS.index)) or '(nothing)'}")

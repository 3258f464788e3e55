"""NumPy proper only at the host boundary: a scan of every module's NumPy calls.

Array code must run unchanged on CuPy, so it uses the namespace of its arrays
(``xp = xp_of(x)``, ``model.xp``) and never NumPy: ``np.exp(x)`` of a GPU array
fails (or, through NumPy's dispatch, works by accident), and ``np.asarray(x)`` copies
it to the host behind your back. NumPy belongs where values enter or leave the
computation: files, data preparation, initialisation drawn on the host, printing,
plotting, measurements.

This test parses every module of the package with ``ast`` and lists every call of a
NumPy function (``np.exp(...)``, ``numpy.linalg.svd(...)``, ``np.add.at(...)``) and
every ``from numpy import``. Each must be allowed by name (ANYWHERE: calls on host
values such as dtypes) or by place (HOST_BOUNDARY: a module or a function at the host
boundary), each with a one-line reason. A new NumPy call in array code fails with a
message that says what to use instead; an entry that no longer allows anything fails
too, so the list stays the real boundary. tests/test_gpu_discipline.py checks the
same rule at run time, through a CuPy stand-in that refuses NumPy.

``python tests/test_host_boundary.py`` prints every NumPy call and why it is allowed.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minilora"

ANYWHERE = {
    "np.dtype": "dtype objects are host metadata",
    "np.issubdtype": "compares dtypes; touches no array",
    "np.float32": "a host scalar",
    "np.float64": "a host scalar",
    "np.random.default_rng": "a host generator: draws that must match on every device",
    "np.errstate": "NumPy's floating-point error mode; touches no array",
}
"""NumPy calls allowed everywhere: they act on host values (dtypes, scalars, seeds)."""

HOST_BOUNDARY = {
    "basics/backend.py": "the one module that chooses NumPy or CuPy",
    "files/io.py": "file formats: reads and writes host arrays",
    "files/gpt2.py": "GPT-2 files: splits, fuses and checks host arrays read or to be written",
    "files/peft.py": "PEFT files: fuses, splits and pads host arrays read or to be written",
    "training/batches.py": "batches are packed and scored on the host",
    "core/tokenizer.py": "characters become ids on the host",
    "core/gradcheck.py": "finite differences' bookkeeping on host copies (backend.to_host)",
    "lab/torch_reference.py": "copies host arrays into PyTorch",
    "cli/demo.py": "prints differences of host copies",
    "lab/experiments.py": "records for figures and notebooks: host values after to_host",
    "lab/plots.py": "plots of host values",
    "lab/update_plots.py": "plots of host values",
    "lab/variants.py": "records for figure and notebook 08: medians and plots of host values",
    "lab/exercises/whole_model.py": "exercises grade learners' NumPy code on host arrays",
    "lab/exercises/many_adapters.py": "exercises grade learners' NumPy code on host arrays",
    "lab/exercises/file_format.py": "a file's bytes become host arrays, as in files/io.py",
    "lab/exercises/quantization.py": "exercises grade learners' NumPy code on host arrays",
    "lab/exercises/grader.py": "compares host copies of learners' results with the reference",
    "core/lora.py::random_factors": "LoRA's random init, drawn on the host in float64, then moved",
    "core/lora.py::pissa_factors": "PiSSA's SVD of a host copy of W, in float64",
    "core/quant.py::normal_float_code": "derives the 16 NF4 values once, on the host",
    "core/quant.py::nf4_quantile_table": "data for a plot: host values, normal quantiles",
    "core/quant.py::dynamic_map": "builds the 8-bit code table once, on the host",
    "core/quant.py::_linspace32": "points of the 8-bit code table, on the host",
    "core/quant.py::_blockwise_absmax": "quantizing runs once, on a host copy of W",
    "core/quant.py::quantize_blockwise": "quantizing runs once, on a host copy of W",
    "core/quant.py::pack_nibbles": "packs host code indices once, before they move",
    "core/quant.py::quantize_nf4": "the NF4 code table as a host array, for quantizing",
    "core/quant.py::quantize": "the code tables as host arrays, moved with the storage",
    "core/quant.py::double_quantize": "quantizes the host constants once",
    "core/quant.py::quantization_error": "a measurement on host copies, in float64",
    "core/qlora.py::requantized_merge_error": "a measurement on host copies, in float64",
    "core/vera.py::vera_vectors": "VeRA's initial vectors, made on the host, then moved",
    "core/model.py::init_parameters": "GPT-2's init, drawn on the host so every device gets it",
    "core/model.py::GPT._as_ids": "token ids are checked on the host before they move",
    "core/model.py::GPT.generate": "sampling from host copies of the last logits with a host rng",
    "core/model.py::weights_fingerprint": "hashes host copies of the weights",
    "core/adapters.py::_weighted_parts": "combine_adapters stacks host copies in float64",
    "core/adapters.py::_truncate": "the SVD of the combined update, on the host in float64",
    "core/optim.py::Optimizer.load_state_dict": "checks the shapes of host state from a checkpoint",
    "training/train.py::evaluate": "joins host copies of the predictions for accuracy",
    "files/checkpoints.py::_check_update_fits": "bounds ΔW from an adapter file's host arrays",
    "training/planted.py::PlantedRankTask.__init__": "the planted change is made on the host",
    "training/planted.py::principal_cosines": "SVDs of host float64 copies of ΔW",
    "training/train.py::kl_divergence": "the KL of host copies, in float64 for precision",
    "lab/claims.py": "records for the claims report: host values after to_host",
    "lab/claims_report.py": "the claims report: host values after to_host",
    "lab/claim_plots.py": "plots of host values",
}
"""Modules ("files/io.py") or functions ("core/model.py::GPT.generate") at the host boundary."""

INSTEAD = (
    "array code must run on CuPy too: use the namespace of the arrays, xp = xp_of(x) "
    "(then xp.exp, xp.zeros, ...), or model.xp / model.backend.asarray in model code; "
    "copy to the host with backend.to_host(x) only where values leave the computation. "
    "If this is host-boundary code, add it to HOST_BOUNDARY in tests/test_host_boundary.py "
    "with a one-line reason"
)


def _dotted(node: ast.AST) -> str | None:
    """ "np.linalg.svd" for the expression np.linalg.svd; None if not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


class _Scanner(ast.NodeVisitor):
    """Every NumPy call and numpy import of one module, with the function it is in."""

    def __init__(self) -> None:
        self.aliases: set[str] = set()
        self.scope: list[str] = []
        self.found: list[tuple[int, str, str]] = []  # (line, qualname, "np.exp" / import)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "numpy":
                self.aliases.add(alias.asname or "numpy")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] == "numpy":
            names = ", ".join(a.name for a in node.names)
            self.found.append(
                (node.lineno, ".".join(self.scope), f"from {node.module} import {names}")
            )

    def _scoped(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func)
        if name and name.split(".")[0] in self.aliases:
            self.found.append((node.lineno, ".".join(self.scope), "np." + name.split(".", 1)[1]))
        self.generic_visit(node)


def numpy_calls(package: Path = PACKAGE) -> list[tuple[str, int, str, str]]:
    """(file, line, function qualname or "", call) for every module of ``package``."""
    calls = []
    for path in sorted(package.rglob("*.py")):
        scanner = _Scanner()
        scanner.visit(ast.parse(path.read_text()))
        calls += [
            (path.relative_to(package).as_posix(), line, where, call)
            for line, where, call in scanner.found
        ]
    return calls


def allowed_by(file: str, where: str, call: str) -> str | None:
    """The ANYWHERE or HOST_BOUNDARY key that allows this call, or None."""
    if call in ANYWHERE:
        return call
    if file in HOST_BOUNDARY:
        return file
    parts = where.split(".") if where else []
    for i in range(len(parts), 0, -1):  # the function, or a function that encloses it
        key = f"{file}::{'.'.join(parts[:i])}"
        if key in HOST_BOUNDARY:
            return key
    return None


def violations(package: Path = PACKAGE) -> list[str]:
    return [
        f"minilora/{file}:{line} in {where or 'the module'}: {call}(...) is NumPy outside "
        f"the host boundary; {INSTEAD}"
        for file, line, where, call in numpy_calls(package)
        if allowed_by(file, where, call) is None
    ]


def test_numpy_is_called_only_at_the_host_boundary():
    found = violations()
    assert not found, "\n".join(found)


def test_every_allowlist_entry_still_allows_something():
    """A stale entry would let new NumPy calls into a place that no longer needs any."""
    used = {allowed_by(file, where, call) for file, _, where, call in numpy_calls()}
    existing = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    stale = [
        key
        for key in HOST_BOUNDARY
        if key not in used and key.split("::")[0] in existing  # a module not written yet: ok
    ]
    assert not stale, f"HOST_BOUNDARY entries that allow no NumPy call any more: {stale}"


def test_the_scan_finds_numpy_in_array_code(tmp_path):
    """The scan can fail: np.exp in an op, numpy under another name, `from numpy import`."""
    (tmp_path / "layers.py").write_text(
        "import numpy as np\nimport numpy\nfrom numpy import exp\n\n"
        "class Op:\n    def forward(self, x):\n"
        "        dt = np.dtype('float32')\n"
        "        return np.exp(x) + numpy.linalg.norm(x) + exp(x)\n"
    )
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "io.py").write_text(
        "import numpy as np\n\ndef save(x):\n    return np.asarray(x)\n"
    )
    found = violations(tmp_path)
    assert [f.split(": ")[1].split("(")[0] for f in found] == [
        "from numpy import exp",
        "np.exp",
        "np.linalg.norm",
    ]
    assert found[1].startswith("minilora/layers.py:8 in Op.forward: np.exp(...)")
    assert "xp = xp_of(x)" in found[1] and "model.xp" in found[1]


if __name__ == "__main__":
    for file, line, where, call in numpy_calls():
        reason_key = allowed_by(file, where, call)
        reason = {**ANYWHERE, **HOST_BOUNDARY}.get(reason_key, "NOT ALLOWED")
        print(f"{file}:{line:<5} {where or '-':34} {call:26} {reason}")

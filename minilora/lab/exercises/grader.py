"""The grader: run a learner's function on random cases and say what is wrong with it.

An :class:`Exercise` names a function the learner writes (its statement gives the
signature, the shapes and the equation), a reference solution, and the cases to run.
``check(name, fn)`` calls ``fn`` on each case (positionally, on fresh copies of the
inputs, so renamed parameters and in-place edits do no harm) and compares every
returned value with the reference's:

1. the kind and shape: a tuple of the right length, arrays of the expected shape (a
   shape that is the expected one reversed is reported as a transpose);
2. NaN or inf anywhere;
3. the relative error ||got - expected|| / max(||got||, ||expected||) against the
   case's tolerance;
4. for a backward, the finite-difference gradient of the forward as well
   (core.gradcheck.check_gradients): independent evidence, not just agreement.

A value that fails is diagnosed: first against the exercise's known mistakes (each a
wrong version of the reference with the hint it earns), then as a transpose, then as
the expected value times a constant (off by exactly the scale s, by 1/(1-p), by a
sign). A stub that raises NotImplementedError is "not implemented yet", a result with
``passed = False``, never an exception; any other exception is shown at the learner's
own line.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import math
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.checks import one_of
from minilora.core.gradcheck import check_gradients, relative_error

FD_TOL = 1e-6  # what every backward of the library reaches against finite differences
MATCH_TOL = 1e-6  # "the learner computed exactly this wrong thing", up to rounding


# ------------------------------------------------------------------ what an exercise is
@dataclass(frozen=True)
class Case:
    """One call of the learner's function.

    ``args`` are passed in order; ``extra`` holds inputs the finite differences need
    but the function does not get (x for a frozen layer's backward); ``factors`` names
    the constants a classic mistake is off by, e.g. {"the scale s": 2.5}.
    """

    label: str
    args: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    tol: float = 1e-9


@dataclass(frozen=True)
class Mistake:
    """A classic wrong answer: ``wrong`` is called like the reference; ``hint`` explains."""

    hint: str
    wrong: Callable[..., Any]


@dataclass(frozen=True)
class Gradient:
    """How to check a backward against finite differences.

    ``forward(env)`` computes the forward output from the case's inputs (``env`` is
    args and extra together, live arrays the check nudges); the scalar is
    sum(forward(env) * env[upstream]); ``wrt`` maps each returned gradient to the
    input it is the gradient of.
    """

    forward: Callable[[dict[str, Any]], Any]
    upstream: str
    wrt: dict[str, str]


@dataclass(frozen=True)
class Exercise:
    """What to implement, the reference, and how to grade it."""

    name: str
    notebook: str  # "01" .. "09", the notebook it belongs to
    statement: str
    reference: Callable[..., Any]
    cases: Callable[[np.random.Generator], list[Case]]
    hint: str  # where to start: shown for a stub that is not implemented yet
    outputs: tuple[str, ...] = ("result",)  # names of the returned values (several: a tuple)
    mistakes: tuple[Mistake, ...] = ()
    gradient: Gradient | None = None
    # the values compared, from the returned ones (default: the returned values themselves)
    compare: Callable[..., dict[str, Any]] | None = None
    exact: tuple[str, ...] = ()  # compared values that must match bit for bit

    def __str__(self) -> str:
        return f"{self.name} (notebook {self.notebook})\n\n{self.statement}"

    @property
    def summary(self) -> str:
        """The statement's first sentence: what the exercise asks, in one line."""
        return self.statement.split("\n")[0].rstrip(":")

    def values(self, returned: tuple) -> dict[str, Any]:
        if self.compare is not None:
            return self.compare(*returned)
        return dict(zip(self.outputs, returned, strict=True))


# ------------------------------------------------------------------------- the results
@dataclass
class CaseResult:
    """One compared value of one case: its errors, the verdict and the hint."""

    case: str
    value: str
    error: float | None = None  # relative error against the reference
    fd_error: float | None = None  # relative error against finite differences
    passed: bool = False
    hint: str = ""


@dataclass
class Result:
    """What ``check`` found: ``passed``, one row per compared value, and a message when
    the function did not run (not implemented yet, or an exception in it)."""

    exercise: str
    cases: list[CaseResult] = field(default_factory=list)
    message: str = ""

    def __repr__(self) -> str:  # short: a notebook shows it under the printed table
        return f"Result({self.exercise!r}, passed={self.passed})"

    @property
    def passed(self) -> bool:
        return not self.message and bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def hints(self) -> list[str]:
        """The distinct hints, in the order they were found."""
        return list(dict.fromkeys(c.hint for c in self.cases if c.hint))

    def __str__(self) -> str:
        if self.message:
            return f"{self.exercise}: {self.message}"
        width = max([len(c.case) for c in self.cases] + [4])
        vwidth = max([len(c.value) for c in self.cases] + [5])
        lines = [f"{'case':<{width}}  {'value':<{vwidth}}  rel. error  finite diff.  result"]
        for c in self.cases:
            err = "-" if c.error is None else f"{c.error:.1e}"
            fd = "-" if c.fd_error is None else f"{c.fd_error:.1e}"
            verdict = "ok" if c.passed else "FAIL"
            lines.append(f"{c.case:<{width}}  {c.value:<{vwidth}}  {err:>10}  {fd:>12}  {verdict}")
        failed = sum(not c.passed for c in self.cases)
        if failed:
            lines.append(f"{self.exercise}: FAILED ({failed} of {len(self.cases)} values wrong)")
            first = {c.value: c.hint for c in reversed(self.cases) if c.hint}  # one per value
            lines += [
                f"  hint: {h}" for h in dict.fromkeys(first[c.value] for c in self.cases if c.hint)
            ]
        else:
            lines.append(f"{self.exercise}: passed ({len(self.cases)} values)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    if exercise.name in _REGISTRY:
        raise ValueError(f"exercise {exercise.name!r} is registered twice")
    _REGISTRY[exercise.name] = exercise
    return exercise


def names() -> list[str]:
    """Every exercise's name in reading order: by notebook, then as the notebook meets them."""
    order = list(_REGISTRY)
    return sorted(order, key=lambda n: (_REGISTRY[n].notebook, order.index(n)))


def get(name: str) -> Exercise:
    """The exercise called ``name`` (see :func:`names`)."""
    return _REGISTRY[one_of("exercise", name, names())]


# ------------------------------------------------------------------------------ check
def check(name: str, fn: Callable[..., Any], verbose: bool = True) -> Result:
    """Grade ``fn`` against exercise ``name``; print the table (``verbose``) and return it.

    ``fn`` is called positionally, in the order of the statement's signature, so its
    parameters may have other names. The cases are drawn from a fixed seed: a check
    gives the same verdict every time.
    """
    exercise = get(name)
    if not callable(fn):
        raise TypeError(f"check needs the function you wrote, got {type(fn).__name__}")
    result = Result(exercise.name)
    for case in exercise.cases(np.random.default_rng(0)):
        expected = _as_tuple(exercise.reference(*copy.deepcopy(case.args).values()))
        try:
            got = fn(*copy.deepcopy(case.args).values())
        except NotImplementedError:
            result.message = f"not implemented yet. Hint: {exercise.hint}"
            break
        except Exception as err:  # the learner's bug: show it, do not raise it
            result.message = learner_error(err)
            break
        rows = _grade(exercise, case, got, expected)
        for row in rows:  # a single returned value needs no name in its hint
            row.hint = row.hint.removeprefix("result: ")
        result.cases += rows
    if verbose:
        print(result)
    return result


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _grade(exercise: Exercise, case: Case, got: Any, expected: tuple) -> list[CaseResult]:
    n = len(exercise.outputs)
    wanted = ", ".join(exercise.outputs)
    if n > 1 and (not isinstance(got, (tuple, list)) or len(got) != n):
        what = f"a tuple of {len(got)}" if isinstance(got, (tuple, list)) else type(got).__name__
        return [CaseResult(case.label, "all", hint=f"returned {what}; expected ({wanted})")]
    if n == 1 and isinstance(got, (tuple, list)):
        hint = f"returned a tuple of {len(got)} values; expected one value, {wanted}"
        return [CaseResult(case.label, wanted, hint=hint)]
    got = _as_tuple(got)
    rows = []
    for out, g, e in zip(exercise.outputs, got, expected, strict=True):
        problem = _kind_problem(g, e)
        if problem:
            rows.append(CaseResult(case.label, out, hint=f"{out}: {problem}"))
    if rows:
        return rows
    got_values = exercise.values(tuple(_host(g) for g in got))
    expected_values = exercise.values(expected)
    fd_errors = _finite_differences(exercise, case, got_values)
    for out, e in expected_values.items():
        g = got_values[out]
        row = CaseResult(case.label, out, fd_error=fd_errors.get(out))
        if not np.all(np.isfinite(g)):
            row.hint = f"{out} contains NaN or inf"
        else:
            row.error = relative_error(g, e) if out not in exercise.exact else _exact_error(g, e)
            tol = 0.0 if out in exercise.exact else case.tol
            fd_ok = row.fd_error is None or row.fd_error < FD_TOL
            row.passed = row.error <= tol and fd_ok
            if not row.passed:
                row.hint = _diagnose(exercise, case, out, g, e)
        rows.append(row)
    return rows


def _host(value: Any) -> Any:
    """A returned array as a NumPy array (lists too); numbers stay numbers."""
    return value if isinstance(value, (int, float, np.ndarray)) else np.asarray(value)


def _kind_problem(got: Any, expected: Any) -> str:
    """What is wrong with the kind or shape of ``got``, or "" when it can be compared."""
    if isinstance(expected, np.ndarray):
        if got is None:
            return f"returned None; expected an array of shape {expected.shape}"
        shape = getattr(got, "shape", None)
        if shape is None:
            return f"returned {type(got).__name__}; expected an array of shape {expected.shape}"
        if tuple(shape) != expected.shape:
            if expected.ndim >= 2 and tuple(shape) == expected.shape[::-1]:
                return f"transposed: shape {tuple(shape)}, expected {expected.shape}"
            return f"wrong shape {tuple(shape)}; expected shape {expected.shape}"
        return ""
    if isinstance(got, np.ndarray) and got.ndim == 0:
        return ""
    if isinstance(got, bool) or not isinstance(got, (int, float, np.number)):
        kind = "None" if got is None else type(got).__name__
        return f"returned {kind}; expected a number"
    return ""


def _exact_error(got: Any, expected: Any) -> float:
    """0.0 when bit for bit equal, else the relative error (at least the smallest > 0)."""
    if np.array_equal(got, expected):
        return 0.0
    return max(relative_error(got, expected), sys.float_info.min)


def _finite_differences(exercise: Exercise, case: Case, got: dict[str, Any]) -> dict[str, float]:
    """The learner's gradients against finite differences of the forward (float64 only)."""
    spec = exercise.gradient
    if spec is None:
        return {}
    env = copy.deepcopy({**case.args, **case.extra})
    if any(env[name].dtype != np.float64 for name in spec.wrt.values()):
        return {}
    dout = env[spec.upstream]

    def loss() -> float:
        return float((spec.forward(env) * dout).sum())

    errors = {}
    for out, name in spec.wrt.items():
        g = got[out]
        if np.shape(g) == env[name].shape and np.all(np.isfinite(g)):
            [row] = check_gradients(loss, {name: env[name]}, {name: np.asarray(g)})
            errors[out] = 0.0 if row.zero else row.error
    return errors


def _diagnose(exercise: Exercise, case: Case, out: str, got: Any, expected: Any) -> str:
    """Name the classic mistake behind a wrong value, if it is one we know."""
    args = case.args
    tol = 0.0 if out in exercise.exact else case.tol
    for mistake in exercise.mistakes:
        try:
            wrong = exercise.values(_as_tuple(mistake.wrong(*copy.deepcopy(args).values())))
        except Exception:  # a mistake that cannot happen for this case's inputs
            continue
        w = wrong.get(out)
        if w is None or np.shape(w) != np.shape(got) or _exact_error(w, expected) <= tol:
            continue  # not a mistake this case can tell from the right answer
        if relative_error(got, w) < MATCH_TOL:
            return f"{out}: {mistake.hint}"
    g, e = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    error = relative_error(g, e)
    if error < MATCH_TOL:
        need = "it must be exact" if tol == 0 else f"the check needs {tol:.0e}"
        return f"{out} is close to the expected value, not equal (error {error:.1e}; {need})"
    if g.ndim == 2 and g.shape[0] == g.shape[1] and relative_error(g, e.T) < MATCH_TOL:
        return f"{out}: transposed (it equals the expected value's transpose)"
    ee = float((e * e).sum())
    c = float((g * e).sum()) / ee if ee > 0 else 0.0
    if ee > 0 and relative_error(g, c * e) < MATCH_TOL:
        return f"{out}: {_factor_hint(c, case.factors)}"
    return f"{out} does not match the reference (relative error {relative_error(g, e):.2g})"


def _factor_hint(c: float, factors: dict[str, float]) -> str:
    """Words for "the value is c times the expected one"."""
    for name, f in factors.items():
        guess = "missing" if math.isclose(c, 1.0 / f, rel_tol=1e-6) else "applied twice"
        if math.isclose(c, 1.0 / f, rel_tol=1e-6) or math.isclose(c, f, rel_tol=1e-6):
            return f"off by exactly {name}: {c:.4g} times the expected value ({name} {guess}?)"
    if math.isclose(c, -1.0, rel_tol=1e-6):
        return "the sign is flipped: -1 times the expected value"
    return f"off by a constant factor: {c:.4g} times the expected value"


# ------------------------------------------------------------------ the learner's code
_LIBRARY_DIRS = tuple(  # each ends with a separator: /x/minilora is not /x/minilora_mine
    os.path.join(str(Path(p).resolve()), "")
    for p in {
        *(p for k, p in sysconfig.get_paths().items() if k in ("stdlib", "purelib")),
        Path(__file__).resolve().parents[2],  # the minilora package
    }
)


def _learner_frame(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``err`` outside the grader, the library, NumPy, the
    standard library and the import machinery: the learner's own line."""
    frames = traceback.extract_tb(err.__traceback__)
    mine = [
        f
        for f in frames
        if not f.filename.startswith("<frozen")
        and not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS)
    ]
    return mine[-1] if mine else None


def learner_error(err: BaseException) -> str:
    """An exception raised in the learner's function, shown at the learner's own line."""
    f = _learner_frame(err)
    where = f'\n  File "{f.filename}", line {f.lineno}, in {f.name}\n    {f.line}' if f else ""
    return f"error in your code: {type(err).__name__}: {err}{where}"


def load_function(path: str | Path, name: str) -> Callable[..., Any]:
    """The function ``name`` defined by the Python file ``path`` (which is executed).

    ValueError, in one line, for a missing file, a file that does not load (its
    error and line), or a file without that function.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"solution file {str(path)!r} does not exist")
    loader = importlib.machinery.SourceFileLoader(f"_solution_{path.stem}", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # as an import would: dataclasses look it up there
    try:
        loader.exec_module(module)
    except Exception as err:  # the learner's file: whatever it raises is bad input here
        f = _learner_frame(err)
        line = err.lineno if isinstance(err, SyntaxError) else f.lineno if f else None
        at = f" at line {line}" if line else ""
        message = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path} does not load: {type(err).__name__}{at}: {message}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(
            f"{path} defines no function {name!r}; the file must define def {name}(...)"
        )
    return fn

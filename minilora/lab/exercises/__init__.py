"""Exercises the learner writes and minilora grades.

``names()`` lists them in reading order, ``get(name)`` returns one (its ``statement``,
its ``reference`` solution), and ``check(name, fn)`` grades a function: random cases
(float64, odd shapes, dropout on and off, r = 1), the reference and, for a backward,
finite differences; a table, hints that name the classic mistakes, and a
:class:`Result` with ``.passed``. From the shell: ``minilora exercises list`` and
``minilora exercises check NAME --file my_solution.py``, where the file defines a
function named after the exercise (``def lora_backward(...)``); notebooks/solutions/
holds worked solutions in that form, one file per notebook.
"""

# importing the exercise modules registers their exercises, in reading order
from minilora.lab.exercises import (  # noqa: F401
    many_adapters,
    one_layer,
    quantization,
    whole_model,
)

# isort: split
from minilora.lab.exercises import file_format  # noqa: F401  (05, after the merges)

# isort: split
from minilora.lab.exercises import family  # noqa: F401  (08)

# isort: split
from minilora.lab.exercises import gpt2_layout  # noqa: F401  (09)

# isort: split
from minilora.lab.exercises.grader import (
    Case,
    CaseResult,
    Exercise,
    Mistake,
    Result,
    check,
    get,
    load_function,
    names,
)

__all__ = [
    "Case",
    "CaseResult",
    "Exercise",
    "Mistake",
    "Result",
    "check",
    "get",
    "load_function",
    "names",
]

"""The argument checks: TypeError for a wrong kind, ValueError for a wrong value, and
a message that names the argument and what is allowed."""

import numpy as np
import pytest

from minilora.basics import checks


@pytest.mark.parametrize(
    ("check", "value", "error", "says"),
    [
        (checks.positive_int, 0, ValueError, "x=0 .*positive integer"),
        (checks.positive_int, True, TypeError, "x=True must be an integer, not bool"),
        (checks.positive_int, 2.0, TypeError, "x=2.0 must be an integer, not float"),
        (checks.positive_int, "3", TypeError, "x='3' must be an integer"),
        (checks.non_negative_int, -1, ValueError, "x=-1 .*integer >= 0"),
        (checks.real, float("nan"), ValueError, "x=nan must be a finite number"),
        (checks.real, False, TypeError, "x=False must be a number, not bool"),
        (checks.positive_real, 0.0, ValueError, "x=0.0 .*positive number"),
        (checks.probability, 1.0, ValueError, "x=1.0 .*0.0 <= x < 1.0"),
        (checks.boolean, "no", TypeError, "x='no' must be True or False"),
        (checks.boolean, 1, TypeError, "x=1 must be True or False"),
    ],
)
def test_bad_values_are_named(check, value, error, says):
    with pytest.raises(error, match=says):
        check("x", value)


def test_good_values_come_back_as_plain_python():
    assert type(checks.positive_int("x", np.int64(3))) is int
    assert type(checks.positive_real("x", np.float32(0.5))) is float
    assert checks.probability("x", 0) == 0.0
    assert checks.in_range("x", 0.5, 0.0, 1.0) == 0.5


def test_names_and_indices():
    assert checks.distinct_names("t", "q", ("q", "v")) == ("q",)  # one bare name
    assert checks.distinct_names("t", ["v", "q"], ("q", "v")) == ("v", "q")
    with pytest.raises(ValueError, match="'qv' is not known; allowed: q, v"):
        checks.distinct_names("t", "qv", ("q", "v"))  # not split into characters
    with pytest.raises(ValueError, match="'wte' is not allowed: a lookup"):
        checks.distinct_names("t", ["wte"], ("q",), refused={"wte": "a lookup"})
    with pytest.raises(ValueError, match="twice"):
        checks.distinct_names("t", ["q", "q"], ("q",))
    with pytest.raises(ValueError, match="empty"):
        checks.distinct_names("t", [], ("q",))
    assert checks.distinct_indices("l", [2, np.int64(0)], stop=3) == (2, 0)
    with pytest.raises(ValueError, match="contains 3; allowed: 0..2"):
        checks.distinct_indices("l", [3], stop=3)
    with pytest.raises(TypeError):
        checks.distinct_indices("l", "01")
    with pytest.raises(ValueError, match="one_of"):
        checks.one_of("one_of", "c", ("a", "b"))

"""`tl_plugin.checks`: one set of argument checks; every error names the argument, the value and what is accepted."""

from __future__ import annotations

import pytest

from tl_plugin import checks
from tl_plugin.checks import check_bool, check_choice, check_int, check_number, check_str_list
from tl_plugin.testing import run_doctests


def test_the_module_examples_run():
    result = run_doctests(checks)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("k", True, minimum=0), "`k` must be an integer >= 0, got True."),
        (lambda: check_int("k", 1.0), "`k` must be an integer, got 1.0."),
        (lambda: check_int("k", 7, minimum=0, maximum=6), "`k` must be an integer in [0, 6], got 7."),
        (lambda: check_number("lr", float("nan"), low=0, include_low=False), "`lr` must be a finite number > 0, got nan."),
        (lambda: check_number("p", 1.0, low=0, high=1, include_high=False), "`p` must be a finite number in [0, 1), got 1.0."),
        (lambda: check_number("d", 0, low=0, high=1, include_low=False, hint="1 or None: no decay"),
         "`d` must be a finite number in (0, 1] (1 or None: no decay), got 0."),
        (lambda: check_bool("flag", 1), "`flag` must be True or False, got 1."),
        (lambda: check_choice("mode", "avg", ("max", "min")), "`mode` must be one of 'max', 'min'; got 'avg'."),
        (lambda: check_str_list("head", ["classifier", ""]), "`head` must be a list of non-empty strings, got ['classifier', '']."),
    ],
)  # fmt: skip
def test_bad_values_are_named_with_what_is_accepted(call, message):
    with pytest.raises(ValueError, match="must be") as caught:
        call()
    assert str(caught.value) == message


def test_good_values_come_back_typed():
    assert check_int("k", 3, minimum=0, maximum=3) == 3
    assert check_number("lr", 1, low=0, include_low=False) == 1.0
    assert isinstance(check_number("lr", 1), float)
    assert check_bool("flag", False) is False
    assert check_choice("mode", "min", ("max", "min")) == "min"
    assert check_str_list("head", ["classifier"]) == ["classifier"]

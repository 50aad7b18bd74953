"""KEDA's scalingModifiers formula (capsim.policy.keda_formula): expr's grammar and rules, KEDA's admission checks."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.policy.keda_formula import FormulaError, compile_formula, trigger_name

T = ("trig_one", "trig_two", "trig_three")


def ev(text: str, **values: float) -> float:
    return compile_formula(text, T).evaluate({n: values.get(n, 1.0) for n in T})


@pytest.mark.parametrize(("text", "values", "want"), [
    # the examples of KEDA's docs (concepts/scaling-deployments, "Scaling Modifiers")
    ("(trig_one + trig_two)/2", {"trig_one": 1, "trig_two": 4}, 2.5),
    ("trig_one > 2 ? trig_one + trig_two : 1", {"trig_one": 3, "trig_two": 4}, 7.0),
    ("trig_one > 2 ? trig_one + trig_two : 1", {"trig_one": 2, "trig_two": 4}, 1.0),
    ("count([trig_one,trig_two,trig_three],{#>1}) > 1 ? 5 : 0", {"trig_one": 2, "trig_two": 2, "trig_three": 0}, 5.0),
    ("count([trig_one,trig_two,trig_three],{#>1}) > 1 ? 5 : 0", {"trig_one": 2, "trig_two": 1, "trig_three": 0}, 0.0),
    # "if trig_one < 2 and trig_one + trig_two >= 2 then 5, if only the first then 10, else 0"
    ("trig_one < 2 ? trig_one+trig_two >= 2 ? 5 : 10 : 0", {"trig_one": 1, "trig_two": 1}, 5.0),
    ("trig_one < 2 ? trig_one+trig_two >= 2 ? 5 : 10 : 0", {"trig_one": 1, "trig_two": 0.5}, 10.0),
    ("trig_one < 2 ? trig_one+trig_two >= 2 ? 5 : 10 : 0", {"trig_one": 3}, 0.0),
    # expr's precedences and associativity (parser/operator/operator.go)
    ("2 ** 3 ** 2", {}, 512.0),  # right to left
    ("-2 ** 2", {}, -4.0),  # unary minus (90) below ** (100)
    ("2 ^ 3 * 2", {}, 16.0),
    ("10 - 4 - 3", {}, 3.0),
    ("12 / 3 / 2", {}, 2.0),
    ("1 + 2 * 3 % 4", {}, 3.0),  # 2 * 3 = 6, 6 % 4 = 2
    ("!true || trig_one > 0 ? 4 : 5", {}, 4.0),  # ! (50) binds tighter than || (10)
    ("trig_one > 1 and trig_two > 1 or trig_three > 0 ? 1 : 0", {"trig_one": 0}, 1.0),  # and (15) over or (10)
    ("1 < trig_one < 3 ? 1 : 0", {"trig_one": 2}, 1.0),  # a chained comparison: 1 < t and t < 3
    ("1 < trig_one < 3 ? 1 : 0", {"trig_one": 3}, 0.0),
    ("trig_one ?? 7", {"trig_one": 2}, 2.0),
    # numbers and functions
    ("7 / 2", {}, 3.5),  # / divides as floats, integers too
    ("-7 % 3", {}, -1.0),  # Go's %: the dividend's sign
    ("int(trig_one) % 2", {"trig_one": 3.9}, 1.0),  # int() truncates
    ("round(2.5) + round(-2.5) + round(0.4)", {}, 0.0),  # half away from zero: 3 - 3 + 0
    ("ceil(trig_one) + floor(trig_two) + abs(-3)", {"trig_one": 1.2, "trig_two": 1.8}, 6.0),
    ("max(trig_one, trig_two, 3)", {"trig_one": 2, "trig_two": 5}, 5.0),
    ("max([trig_one, trig_two])", {"trig_one": 2, "trig_two": 5}, 5.0),
    ("min(trig_one)", {"trig_one": 2}, 2.0),
    ("sum([trig_one, 2]) + mean([1, 2]) + median([1, 5, 9])", {"trig_one": 2}, 10.5),
    ("all([trig_one, trig_two], # > 1) ? 1 : 2", {"trig_one": 2, "trig_two": 2}, 1.0),
    ("none([trig_one, trig_two], # > 1) ? 1 : 2", {"trig_one": 2, "trig_two": 0}, 2.0),
    ("one([trig_one, trig_two], {# > 1}) ? 1 : 2", {"trig_one": 2, "trig_two": 0}, 1.0),
    ("len([trig_one, trig_two, 3])", {}, 3.0),
    ("0x10 + 1_000 + 1e2 + .5", {}, 1116.5),
    ("float(trig_one > 1 ? 1 : 0)", {"trig_one": 2}, 1.0),  # starts with float(: not wrapped again
])
def test_a_formula_evaluates_as_expr_does(text: str, values: dict[str, float], want: float) -> None:
    assert ev(text, **values) == want


def test_a_division_by_zero_is_an_infinity_or_nan_as_gos_floats() -> None:
    assert ev("trig_one / 0", trig_one=2) == math.inf
    assert ev("trig_one / 0", trig_one=-2) == -math.inf
    assert math.isnan(ev("trig_one / 0", trig_one=0))


@pytest.mark.parametrize(("text", "message", "column"), [
    ("trig_one > 1", "the formula's value is bool", None),
    ("foo + 1", "unknown name 'foo': a formula names the triggers (trig_one, trig_three, trig_two)", 1),
    ("trig_one % 2", "operator % (integers only", 10),
    ("trig_one +", "unexpected end of formula", 11),
    ("(trig_one", "expected ')'", 10),
    ("1 +* 2", "unexpected '*'", 4),
    ("'a'", "strings are not numbers", 1),
    ("trig_one.x", "member access and indexing are not supported", 9),
    ("trig_one[0]", "member access and indexing are not supported", 9),
    ("trig_one in [1]", "'in' is not supported", 10),
    ("let x = 1; x", "let is not supported", 1),
    ("max()", "max() needs at least one argument", 1),
    ("trig_one && true", "operator && takes bool, not float", 10),
    ("trig_one ? 1 : 2", "a condition (before ?) takes bool", 10),
    ("trig_one ?? 1 + 2", "cannot be mixed", 15),
    ("# + 1", "outside a predicate", 1),
    ("count(trig_one, # > 1)", "count()'s first argument takes array", 1),
    ("upper(trig_one)", "function upper() is not supported", 1),
    ("", "the formula is empty", None),
    # KEDA's admission runs the formula with every trigger at 1 (validateScalingModifiersFormula)
    ("int(trig_one) % (int(trig_two) - 1)", "integer divide by zero", 15),
])
def test_a_formula_keda_would_refuse_is_refused_with_the_column(text: str, message: str, column: int | None) -> None:
    with pytest.raises(FormulaError) as err:
        compile_formula(text, T)
    assert message in str(err.value)
    assert (None if err.value.column is None else err.value.column + 1) == column


def test_a_type_error_on_a_branch_the_dummy_run_does_not_take_is_refused_as_exprs_compiler_does() -> None:
    with pytest.raises(FormulaError, match="operator && takes bool"):
        compile_formula("trig_one > 5 ? (trig_two && true ? 1 : 0) : 2", T)  # at 1s the dummy run takes 2


def test_trigger_names_are_expr_identifiers() -> None:
    assert trigger_name("vllm:num_requests_waiting") == "vllm_num_requests_waiting"
    assert trigger_name("capsim_gpu_busy_ratio") == "capsim_gpu_busy_ratio"
    assert trigger_name("DCGM_FI_DEV_GPU_UTIL") == "DCGM_FI_DEV_GPU_UTIL"
    assert trigger_name("9lives") == "m_9lives"
    compile_formula(f"{trigger_name('vllm:num_requests_waiting')} / 4", [trigger_name("vllm:num_requests_waiting")])


# ---- a property: arithmetic parses with Python's precedences, which expr's share for + - * / and unary minus ------
_ops = st.sampled_from(["+", "-", "*", "/"])
_leaf = st.one_of(st.sampled_from(T), st.integers(1, 9).map(str), st.sampled_from(["0.5", "2.25"]))


def _expr(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return _leaf
    sub = _expr(depth - 1)
    return st.one_of(
        _leaf,
        st.tuples(sub, _ops, sub).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        sub.map(lambda s: f"({s})"),
        sub.map(lambda s: f"-{s}" if not s.startswith("-") else s),
    )


@settings(max_examples=300, deadline=None)
@given(_expr(3), st.tuples(*[st.floats(0.125, 64, allow_nan=False) for _ in T]))
def test_arithmetic_agrees_with_pythons(text: str, values: tuple[float, ...]) -> None:
    env = dict(zip(T, values, strict=True))
    try:
        want = float(eval(text, {}, dict(env)))  # a generated arithmetic expression
    except ZeroDivisionError:
        return
    got = compile_formula(text, T).evaluate(env)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)

"""The formula of KEDA's ``scalingModifiers``: one composite metric computed from the triggers' values.

KEDA (``advanced.scalingModifiers.formula``, kedacore/keda ``pkg/scaling/modifiers``) evaluates the formula with
the expression language expr (expr-lang/expr, MIT), each trigger's value bound to the trigger's ``name``, and
hands the HPA the result as ``composite-metric``. This module parses and evaluates the part of that language a
formula over numbers uses, with expr's rules re-implemented here (``parser/parser.go``,
``parser/operator/operator.go``, ``vm/runtime``):

* numbers: integers (``2``, ``1_000``, ``0x1f``) and floats (``0.5``, ``1e3``); the triggers' values are floats;
  ``true``, ``false`` and ``nil``; arrays (``[a, b]``);
* operators, lowest precedence first: the conditional ``c ? x : y`` (and ``c ?: y``), ``||`` / ``or`` (10),
  ``&&`` / ``and`` (15), the comparisons ``== != < > <= >=`` (20; ``a < b < c`` means ``a < b && b < c``),
  ``+ -`` (30), ``* / %`` (60), unary ``! not`` (50) and ``- +`` (90), ``** ^`` (100, right to left), ``??`` (500);
  ``/`` always divides as floats (a zero divisor gives an infinity or NaN, as Go's floats do), ``%`` takes
  integers only, ``**`` is ``math.Pow``; ``+ - *`` keep integers integer;
* functions: ``abs ceil floor round int float max min sum mean median len`` and, over an array with a predicate
  on ``#`` (its element), ``count all any none one`` (``count([a, b, c], {# > 1})``, the braces optional).

Anything else expr has (strings, maps, member access, ``let``, pipes, ``in``, ``matches``) is refused with the
column where it starts. As KEDA does, a formula is wrapped in ``float(...)`` unless it already starts with
``float(``, may name only the triggers, and must run with every trigger at 1
(``ValidateAndCompileScalingModifiers``); operand types are checked before that, as expr's compiler does, so a
formula that could not compile in KEDA is refused here even where the dummy run would not reach it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMPOSITE_METRIC", "Formula", "FormulaError", "compile_formula", "trigger_name"]

#: the External metric KEDA gives the HPA for the formula's value (``kedav1alpha1.CompositeMetricName``)
COMPOSITE_METRIC = "composite-metric"


class FormulaError(ValueError):
    """A formula that KEDA would refuse (or that capsim does not evaluate), with the column it is about."""

    def __init__(self, message: str, column: int | None = None) -> None:
        self.column = column
        super().__init__(message if column is None else f"{message} (column {column + 1})")


def trigger_name(metric: str) -> str:
    """The trigger name a formula calls metric ``metric`` by: every character other than a letter, digit or
    underscore replaced by ``_`` (``vllm:num_requests_waiting`` -> ``vllm_num_requests_waiting``), and ``m_``
    before a leading digit, so that the name is an identifier of expr."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", metric)
    return f"m_{name}" if name[:1].isdigit() else name


# ---- the lexer ---------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>0[xX][0-9a-fA-F_]+|(?:\d[\d_]*)?\.\d[\d_]*(?:[eE][+-]?\d+)?|\d[\d_]*(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op>\*\*|\?\?|\?\.|==|!=|<=|>=|&&|\|\||\.\.|::|[-+*/%^<>!?:,#.|=;])
  | (?P<bracket>[()\[\]{}])
  | (?P<string>["'`])
""", re.VERBOSE)
_WORD_OPS = {"and", "or", "not", "in", "matches", "contains", "startsWith", "endsWith", "let"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # number, name, op, bracket, end
    text: str
    col: int


def _lex(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FormulaError(f"unexpected character {text[pos]!r}", pos)
        kind = m.lastgroup
        assert kind is not None
        if kind == "string":
            raise FormulaError("strings are not numbers: a formula computes with the triggers' values", pos)
        if kind != "space":
            value = m.group()
            out.append(_Tok("op" if kind == "name" and value in _WORD_OPS else kind, value, pos))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


# ---- the tree ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Node:
    op: str  # num, bool, nil, name, pointer, array, unary, binary, cond, call
    col: int
    value: Any = None  # a literal's value, a name, an operator, a function's name
    args: tuple[_Node, ...] = ()


_BINARY = {"or": 10, "||": 10, "and": 15, "&&": 15, "==": 20, "!=": 20, "<": 20, ">": 20, ">=": 20, "<=": 20,
           "+": 30, "-": 30, "*": 60, "/": 60, "%": 60, "**": 100, "^": 100, "??": 500}
_RIGHT = {"**", "^"}
_UNARY = {"not": 50, "!": 50, "-": 90, "+": 90}
_COMPARE = {"==", "!=", "<", ">", ">=", "<="}
_PREDICATE_FUNCS = {"count": True, "all": False, "any": False, "none": False, "one": False}  # name: predicate optional
_FUNCS = {"abs", "ceil", "floor", "round", "int", "float", "max", "min", "sum", "mean", "median", "len"}


class _Parser:
    """expr's recursive-descent parser (``parseExpression``, ``parseConditional``, ``parseComparison``)."""

    def __init__(self, tokens: list[_Tok]) -> None:
        self.toks = tokens
        self.i = 0
        self.depth = 0  # inside a predicate: ``#`` is its element

    @property
    def cur(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.cur
        if tok.kind == "end":
            raise FormulaError("unexpected end of formula", tok.col)
        self.i += 1
        return tok

    def at(self, text: str) -> bool:
        """Whether the current token is the operator or bracket ``text``."""
        return self.cur.kind in ("op", "bracket") and self.cur.text == text

    def items(self, close: str) -> list[_Node]:
        """Expressions separated by commas up to the bracket ``close`` (consumed), a trailing comma allowed: an
        array's elements (``parseArrayExpression``), a call's arguments (``parseArguments``)."""
        out: list[_Node] = []
        while not self.at(close):
            if out:
                self.expect(",")
                if self.at(close):
                    break
            out.append(self.expression(0))
        self.expect(close)
        return out

    def expect(self, text: str) -> None:
        if not self.at(text):
            what = "the end of the formula" if self.cur.kind == "end" else repr(self.cur.text)
            raise FormulaError(f"expected {text!r}, found {what}", self.cur.col)
        self.i += 1

    def expression(self, precedence: int = 0) -> _Node:
        if precedence == 0 and self.at("let"):
            raise FormulaError("let is not supported by capsim's formula evaluator", self.cur.col)
        left = self.primary()
        prev = ""
        while self.cur.kind == "op":
            tok = self.cur
            if tok.text in ("not", "in", "matches", "contains", "startsWith", "endsWith", "|", ".."):
                raise FormulaError(f"{tok.text!r} is not supported by capsim's formula evaluator", tok.col)
            prec = _BINARY.get(tok.text)
            if prec is None or prec < precedence:
                break
            self.next()
            if prev == "??" and tok.text != "??":
                raise FormulaError(f"operator ({tok.text}) and coalesce expressions (??) cannot be mixed; wrap "
                                   f"either in parentheses", tok.col)
            if tok.text in _COMPARE:
                left = self.comparison(left, tok, prec)
            else:
                right = self.expression(prec if tok.text in _RIGHT else prec + 1)
                left = _Node("binary", tok.col, tok.text, (left, right))
            prev = tok.text
        if precedence == 0:
            left = self.conditional(left)
        return left

    def comparison(self, left: _Node, tok: _Tok, prec: int) -> _Node:
        root: _Node | None = None
        while True:
            right = self.expression(prec + 1)
            node = _Node("binary", tok.col, tok.text, (left, right))
            root = node if root is None else _Node("binary", tok.col, "&&", (root, node))
            left = right
            tok = self.cur
            if not (tok.kind == "op" and tok.text in _COMPARE):
                return root
            self.next()

    def conditional(self, node: _Node) -> _Node:
        while self.at("?"):
            col = self.next().col
            if self.at(":"):  # c ?: y
                self.next()
                node = _Node("cond", col, None, (node, node, self.expression(0)))
                continue
            yes = self.expression(0)
            self.expect(":")
            node = _Node("cond", col, None, (node, yes, self.expression(0)))
        return node

    def primary(self) -> _Node:
        tok = self.cur
        if tok.kind == "op" and tok.text in _UNARY:
            self.next()
            return self.postfix(_Node("unary", tok.col, tok.text, (self.expression(_UNARY[tok.text]),)))
        if tok.kind == "bracket" and tok.text == "(":
            self.next()
            inner = self.expression(0)
            self.expect(")")
            return self.postfix(inner)
        if tok.kind == "op" and tok.text == "#":
            if self.depth == 0:
                raise FormulaError("# (a predicate's element) outside a predicate", tok.col)
            self.next()
            if self.cur.kind == "name":
                raise FormulaError("named pointers (#name) are not supported by capsim's formula evaluator",
                                   self.cur.col)
            return self.postfix(_Node("pointer", tok.col))
        return self.secondary()

    def secondary(self) -> _Node:
        tok = self.next()
        if tok.kind == "name":
            if tok.text in ("true", "false"):
                return _Node("bool", tok.col, tok.text == "true")
            if tok.text == "nil":
                return _Node("nil", tok.col)
            if self.at("("):
                return self.postfix(self.call(tok))
            return self.postfix(_Node("name", tok.col, tok.text))
        if tok.kind == "number":
            return self.postfix(_Node("num", tok.col, _number(tok)))
        if tok.kind == "bracket" and tok.text == "[":
            return self.postfix(_Node("array", tok.col, None, tuple(self.items("]"))))
        what = "the end of the formula" if tok.kind == "end" else repr(tok.text)
        raise FormulaError(f"unexpected {what}", tok.col)

    def postfix(self, node: _Node) -> _Node:
        tok = self.cur
        if (tok.kind == "op" and tok.text in (".", "?.")) or (tok.kind == "bracket" and tok.text == "["):
            raise FormulaError("member access and indexing are not supported by capsim's formula evaluator", tok.col)
        return node

    def call(self, name: _Tok) -> _Node:
        fn = name.text
        if fn not in _FUNCS and fn not in _PREDICATE_FUNCS:
            raise FormulaError(f"function {fn}() is not supported by capsim's formula evaluator (it has "
                               f"{', '.join(sorted(_FUNCS | set(_PREDICATE_FUNCS)))})", name.col)
        self.expect("(")
        if fn not in _PREDICATE_FUNCS:
            return _Node("call", name.col, fn, tuple(self.items(")")))
        args = [self.expression(0)]
        if not self.at(")") or not _PREDICATE_FUNCS[fn]:
            self.expect(",")
            args.append(self.predicate())
        if self.at(","):
            self.next()
        self.expect(")")
        return _Node("call", name.col, fn, tuple(args))

    def predicate(self) -> _Node:
        braces = self.at("{")
        if braces:
            self.next()
        self.depth += 1
        node = self.expression(0)
        self.depth -= 1
        if braces:
            self.expect("}")
        return _Node("predicate", node.col, None, (node,))


def _number(tok: _Tok) -> int | float:
    text = tok.text.replace("_", "")
    try:
        if text[:2].lower() == "0x":
            return int(text, 16)
        if any(c in text.lower() for c in ".e"):
            return float(text)
        return int(text)
    except ValueError:
        raise FormulaError(f"invalid number {tok.text!r}", tok.col) from None


# ---- the type check (expr's checker, for the types a numeric formula has) ------------------------------------------
_NUM = ("int", "float")


def _num_kind(a: str, b: str) -> str:
    return "int" if a == b == "int" else "float" if a in _NUM and b in _NUM else "any"


def _check(node: _Node, elem: str = "any") -> str:
    """The kind of ``node``'s value (int, float, bool, nil, array or any), refusing what expr's compiler refuses."""
    op = node.op
    if op == "num":
        return "int" if isinstance(node.value, int) else "float"
    if op in ("bool", "nil"):
        return op
    if op == "name":
        return "float"
    if op == "pointer":
        return elem
    if op == "array":
        for item in node.args:
            _check(item, elem)
        return "array"
    if op == "unary":
        k = _check(node.args[0], elem)
        if node.value in ("!", "not"):
            _want(k, ("bool",), node, f"operator {node.value}")
            return "bool"
        _want(k, _NUM, node, f"unary {node.value}")
        return k
    if op == "cond":
        _want(_check(node.args[0], elem), ("bool",), node, "a condition (before ?)")
        a, b = _check(node.args[1], elem), _check(node.args[2], elem)
        return a if a == b else "any"
    if op == "binary":
        a, b = _check(node.args[0], elem), _check(node.args[1], elem)
        o = node.value
        if o == "??":
            return a if a == b else "any"
        if o in ("&&", "and", "||", "or"):
            _want(a, ("bool",), node, f"operator {o}")
            _want(b, ("bool",), node, f"operator {o}")
            return "bool"
        if o in ("==", "!="):
            return "bool"
        _want(a, _NUM, node, f"operator {o}")
        _want(b, _NUM, node, f"operator {o}")
        if o in _COMPARE:
            return "bool"
        if o == "%":
            _want(a, ("int",), node, "operator % (integers only; use a trigger's value with int())")
            _want(b, ("int",), node, "operator % (integers only; use a trigger's value with int())")
            return "int"
        if o in ("/", "**", "^"):
            return "float"
        return _num_kind(a, b)
    assert op == "call", op
    fn = node.value
    if fn in _PREDICATE_FUNCS:
        _want(_check(node.args[0], elem), ("array",), node, f"{fn}()'s first argument")
        if len(node.args) > 1:
            pk = _check(node.args[1].args[0], _element_kind(node.args[0]))
            _want(pk, ("bool",), node, f"{fn}()'s predicate")
        return "int" if fn == "count" else "bool"
    kinds = [_check(a, elem) for a in node.args]
    if fn in ("max", "min", "sum", "mean", "median", "len"):
        if fn in ("max", "min") and (len(kinds) != 1 or kinds[0] in _NUM):
            if not kinds:
                raise FormulaError(f"{fn}() needs at least one argument", node.col)
            for k in kinds:
                _want(k, _NUM, node, f"{fn}()'s arguments")
            return kinds[0] if len(set(kinds)) == 1 else "any"
        if len(kinds) != 1:
            raise FormulaError(f"{fn}() takes one array", node.col)
        _want(kinds[0], ("array",), node, f"{fn}()'s argument")
        return "int" if fn == "len" else "float" if fn in ("mean", "median") else "any"
    if len(kinds) != 1:
        raise FormulaError(f"{fn}() takes one argument, got {len(kinds)}", node.col)
    _want(kinds[0], _NUM, node, f"{fn}()'s argument")
    return {"abs": kinds[0], "int": "int"}.get(fn, "float")


def _element_kind(node: _Node) -> str:
    if node.op != "array" or not node.args:
        return "any"
    kinds = {_check(a) for a in node.args}
    return kinds.pop() if len(kinds) == 1 else "any"


def _want(kind: str, allowed: Sequence[str], node: _Node, what: str) -> None:
    if kind != "any" and kind not in allowed:
        raise FormulaError(f"{what} takes {' or '.join(allowed)}, not {kind}", node.col)


# ---- evaluation (expr's runtime) -----------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _num(v: Any, node: _Node, what: str) -> int | float:
    if not _is_num(v):
        raise FormulaError(f"{what} takes a number, got {_kind_of(v)}", node.col)
    return v  # type: ignore[no-any-return]


def _kind_of(v: Any) -> str:
    return "nil" if v is None else "bool" if isinstance(v, bool) else "array" if isinstance(v, list) else type(v).__name__


def _fdiv(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _pow(a: float, b: float) -> float:
    try:
        return math.pow(a, b)
    except ZeroDivisionError:  # Go's math.Pow(0, negative) is +Inf
        return math.inf
    except (ValueError, OverflowError):  # a negative base to a fractional power: NaN; overflow: Inf
        return math.nan if a < 0 else math.inf


def _go_round(x: float) -> float:
    """Go's ``math.Round``: half away from zero."""
    return math.copysign(math.floor(abs(x) + 0.5), x) if math.isfinite(x) else x


def _eval(node: _Node, env: Mapping[str, float], elem: Any = None) -> Any:
    op = node.op
    if op in ("num", "bool"):
        return node.value
    if op == "nil":
        return None
    if op == "name":
        return float(env[node.value])
    if op == "pointer":
        return elem
    if op == "array":
        return [_eval(a, env, elem) for a in node.args]
    if op == "unary":
        v = _eval(node.args[0], env, elem)
        if node.value in ("!", "not"):
            if not isinstance(v, bool):
                raise FormulaError(f"operator {node.value} takes a bool, got {_kind_of(v)}", node.col)
            return not v
        n = _num(v, node, f"unary {node.value}")
        return -n if node.value == "-" else n
    if op == "cond":
        c = _eval(node.args[0], env, elem)
        if not isinstance(c, bool):
            raise FormulaError(f"a condition (before ?) takes a bool, got {_kind_of(c)}", node.col)
        return _eval(node.args[1] if c else node.args[2], env, elem)
    if op == "binary":
        return _binary(node, env, elem)
    return _call(node, env, elem)


def _binary(node: _Node, env: Mapping[str, float], elem: Any) -> Any:
    o = node.value
    left = _eval(node.args[0], env, elem)
    if o == "??":
        return left if left is not None else _eval(node.args[1], env, elem)
    if o in ("&&", "and", "||", "or"):
        if not isinstance(left, bool):
            raise FormulaError(f"operator {o} takes a bool, got {_kind_of(left)}", node.col)
        if left == (o in ("||", "or")):  # short circuit
            return left
        right = _eval(node.args[1], env, elem)
        if not isinstance(right, bool):
            raise FormulaError(f"operator {o} takes a bool, got {_kind_of(right)}", node.col)
        return right
    right = _eval(node.args[1], env, elem)
    if o in ("==", "!="):
        same = (left == right) if (_is_num(left) and _is_num(right)) or type(left) is type(right) else False
        return same if o == "==" else not same
    a, b = _num(left, node, f"operator {o}"), _num(right, node, f"operator {o}")
    if o == "<":
        return a < b
    if o == ">":
        return a > b
    if o == "<=":
        return a <= b
    if o == ">=":
        return a >= b
    if o == "/":
        return _fdiv(float(a), float(b))
    if o in ("**", "^"):
        return _pow(float(a), float(b))
    if o == "%":
        if not (isinstance(a, int) and isinstance(b, int)):
            raise FormulaError("operator % takes integers", node.col)
        if b == 0:
            raise FormulaError("integer divide by zero (operator %)", node.col)
        return a - b * int(a / b) if abs(a) < 2 ** 53 else int(math.fmod(a, b))  # Go's %: the dividend's sign
    if o == "+":
        return a + b
    if o == "-":
        return a - b
    return a * b


def _items(v: Any, node: _Node, fn: str) -> list[Any]:
    if not isinstance(v, list):
        raise FormulaError(f"{fn}() takes an array, got {_kind_of(v)}", node.col)
    return v


def _call(node: _Node, env: Mapping[str, float], elem: Any) -> Any:
    fn = node.value
    if fn in _PREDICATE_FUNCS:
        items = _items(_eval(node.args[0], env, elem), node, fn)
        if len(node.args) == 1:  # count(array): its true elements
            hits = [x for x in items if _truth(x, node, fn)]
        else:
            body = node.args[1].args[0]
            hits = [x for x in items if _truth(_eval(body, env, x), node, fn)]
        n = len(hits)
        return {"count": n, "all": n == len(items), "any": n > 0, "none": n == 0, "one": n == 1}[fn]
    args = [_eval(a, env, elem) for a in node.args]
    if fn == "len":
        return len(_items(args[0], node, fn))
    if fn in ("max", "min", "sum", "mean", "median"):
        spread = fn in ("max", "min") and (len(args) != 1 or not isinstance(args[0], list))
        values = [_num(a, node, f"{fn}()") for a in (args if spread else _items(args[0], node, fn))]
        if fn == "sum":
            return sum(values, 0)
        if not values:
            raise FormulaError(f"{fn}() of an empty array", node.col)
        if fn == "mean":
            return float(sum(values)) / len(values)
        if fn == "median":
            return float(statistics.median(values))
        return max(values) if fn == "max" else min(values)
    x = _num(args[0], node, f"{fn}()")
    if fn == "abs":
        return abs(x)
    if fn == "int":
        if isinstance(x, float) and not math.isfinite(x):
            raise FormulaError(f"int() of {x}", node.col)
        return int(x)  # Go's int(float64) truncates toward zero
    fx = float(x)
    if fn == "float" or not math.isfinite(fx):
        return fx
    return float(math.ceil(fx)) if fn == "ceil" else float(math.floor(fx)) if fn == "floor" else _go_round(fx)


def _truth(v: Any, node: _Node, fn: str) -> bool:
    if not isinstance(v, bool):
        raise FormulaError(f"{fn}()'s predicate takes a bool, got {_kind_of(v)}", node.col)
    return v


# ---- the compiled formula ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Formula:
    """A formula KEDA would accept, over the triggers ``names``."""

    text: str
    names: tuple[str, ...]
    _tree: _Node

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The composite metric for the triggers' ``values`` (by trigger name): the formula's value as a float,
        which may be infinite or NaN (a division by zero). Raises :class:`FormulaError` where expr's run fails (an
        integer ``%`` by zero, ``int()`` of an infinity)."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise KeyError(f"no value for trigger(s) {missing}")
        out = _eval(self._tree, values)
        if not _is_num(out):  # only where the formula starts with float( and so is not wrapped
            raise FormulaError(f"the formula's value is {_kind_of(out)}, not a number")
        return float(out)


def compile_formula(text: str, names: Sequence[str]) -> Formula:
    """``text`` checked as KEDA's admission does (``ValidateAndCompileScalingModifiers``): wrapped in ``float()``
    unless it starts with ``float(``, parsed, its names among the triggers' ``names``, its operands' types checked,
    and run with every trigger at 1."""
    if not text.strip():
        raise FormulaError("the formula is empty (KEDA: ScalingModifiers.Formula is mandatory)")
    parser = _Parser(_lex(text))
    body = parser.expression(0)
    if parser.cur.kind != "end":
        raise FormulaError(f"unexpected {parser.cur.text!r}", parser.cur.col)
    known = set(names)
    for node in _walk(body):
        if node.op == "name" and node.value not in known:
            raise FormulaError(f"unknown name {node.value!r}: a formula names the triggers "
                               f"({', '.join(sorted(known)) or 'none'})", node.col)
    kind = _check(body)
    if kind in ("bool", "nil", "array"):
        raise FormulaError(f"the formula's value is {'an array' if kind == 'array' else kind}; it must be a number "
                           f"(KEDA runs float() of it)")
    wrapped = body if text.startswith("float(") else _Node("call", 0, "float", (body,))
    formula = Formula(text, tuple(names), wrapped)
    formula.evaluate(dict.fromkeys(names, 1.0))
    return formula


def _walk(node: _Node) -> list[_Node]:
    out = [node]
    for a in node.args:
        out += _walk(a)
    return out

"""The symbolic layer: a variant's elementwise math as sympy, its derivatives, and Triton code.

Templates never contain a hand-written derivative. They call the functions generated here:
  _features(x[, t, th])            the feature map phi, then LRPE's rotation (if any)
  _features_grad(x, [t, th,] g..)  its vector-Jacobian product (input grad, and theta grad under LRPE)
  _gate(x), _gate_grad(x)          the output gate's activation and its derivative (gated variants)
Both are built from one sympy expression per variant and differentiated by sympy.
"""
from __future__ import annotations

import functools

import sympy
from sympy.core.function import AppliedUndef
from sympy.printing.str import StrPrinter

x = sympy.Symbol("x", real=True)


class sigmoid(sympy.Function):
    """1 / (1 + exp(-x)), kept as one function so its derivative stays finite for any x."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, arg, **kwargs):
        return 1 / (1 + sympy.exp(-arg))


def _elu(arg):
    return sympy.Piecewise((arg, arg > 0), (sympy.exp(arg) - 1, True))


def _relu(arg):
    return sympy.Piecewise((arg, arg > 0), (0, True))


# Functions a user may write in a phi expression, beyond sympy's exp, log, sin, cos, sqrt, Abs, Max, Min.
_NAMESPACE = {
    "x": x,
    "sigmoid": sigmoid,
    "silu": lambda a: a * sigmoid(a),
    "swish": lambda a: a * sigmoid(a),
    "elu": _elu,
    "relu": _relu,
    "tanh": lambda a: 2 * sigmoid(2 * a) - 1,
    "exp": sympy.exp, "log": sympy.log, "sin": sympy.sin, "cos": sympy.cos, "sqrt": sympy.sqrt,
    "Abs": sympy.Abs, "abs": sympy.Abs, "Max": sympy.Max, "Min": sympy.Min, "Piecewise": sympy.Piecewise,
}

KNOWN_FEATURE_MAPS = {
    "identity": x,
    "silu": x * sigmoid(x),
    "elu+1": _elu(x) + 1,
    "relu": _relu(x),
}


KNOWN_GATES = {
    "identity": x,
    "sigmoid": sigmoid(x),
    "silu": x * sigmoid(x),
}


@functools.lru_cache(maxsize=None)
def feature_map(phi: str) -> sympy.Expr:
    """phi as a sympy expression in x: a known name or an expression text."""
    return elementwise("phi", phi, KNOWN_FEATURE_MAPS)


@functools.lru_cache(maxsize=None)
def gate_act(gate: str) -> sympy.Expr:
    """The output gate's activation act (the epilogue multiplies o by act(u)): a name or an expression in x."""
    return elementwise("gate", gate, KNOWN_GATES)


def elementwise(key: str, text: str, known: dict) -> sympy.Expr:
    """A spec's elementwise function of x (`key`=text) as sympy: a known name or an expression text,
    checked to have a Triton translation, derivative included."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{key}={text!r}: expected a known name ({', '.join(known)}) or an expression in x")
    if text in known:
        return known[text]
    try:
        expr = sympy.parse_expr(text, local_dict=dict(_NAMESPACE), evaluate=True)
    except Exception as err:  # sympy raises many types for bad text
        raise ValueError(f"{key}={text!r}: not a known name ({', '.join(known)}) "
                         f"and not a valid expression in x ({type(err).__name__}: {err})") from None
    if not isinstance(expr, sympy.Expr):
        raise ValueError(f"{key}={text!r}: expected an expression in x, got {type(expr).__name__}")
    unknown = sorted({type(f).__name__ for f in expr.atoms(AppliedUndef)})
    if unknown:
        raise ValueError(f"{key}={text!r}: unknown function(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(k for k in _NAMESPACE if k != 'x'))}")
    extra = sorted(str(s) for s in expr.free_symbols if s != x)
    if extra:
        raise ValueError(f"{key}={text!r}: the only free symbol allowed is x, found {', '.join(extra)}")
    try:  # fail now, not at kernel build time, on functions Triton lacks
        to_triton(expr)
        to_triton(sympy.diff(expr, x))
    except ValueError as err:
        raise ValueError(f"{key}={text!r}: {err}") from None
    return expr


# ---- printing sympy as Triton -------------------------------------------------------------

class TritonPrinter(StrPrinter):
    """Prints an elementwise sympy expression as Triton (tl.*) code on fp32 tensors."""

    _functions = {"exp": "tl.exp", "log": "tl.log", "sin": "tl.sin", "cos": "tl.cos", "Abs": "tl.abs"}

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name == "sigmoid":  # a helper of the templates (_features.j2): one special-function instruction on a GPU
            return f"_sigmoid({self._print(expr.args[0])})"
        if name in self._functions:
            return f"{self._functions[name]}({self._print(expr.args[0])})"
        raise ValueError(f"function {name!r} has no Triton translation "
                         f"(supported: {', '.join(sorted(self._functions))}, sigmoid, sign, Max, Min, Piecewise, powers)")

    _print_Abs = _print_exp = _print_log = _print_sin = _print_cos = _print_Function

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.as_base_exp()
        if base == 2:
            return f"tl.exp2({self._print(exp)})"
        b = self.parenthesize(base, 100)
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"(1.0 / tl.sqrt({self._print(base)}))"
        if exp.is_Integer and 0 < exp <= 4:
            return "(" + " * ".join([b] * int(exp)) + ")"
        if exp.is_Integer and -4 <= exp < 0:
            return "(1.0 / (" + " * ".join([b] * int(-exp)) + "))"
        return f"tl.exp(({self._print(exp)}) * tl.log({self._print(base)}))"

    def _print_Piecewise(self, expr):
        *cases, (last, cond) = expr.args
        if cond != sympy.true:
            raise ValueError(f"Piecewise {expr} needs a final (value, True) case")
        out = self._print(last)
        for value, cond in reversed(cases):
            out = f"tl.where({self._print(cond)}, {self._print(value)}, {out})"
        return out

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _minmax(self, expr, fn):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out

    def _print_Max(self, expr):
        return self._minmax(expr, "tl.maximum")

    def _print_Min(self, expr):
        return self._minmax(expr, "tl.minimum")

    def _print_sign(self, expr):
        arg = self._print(expr.args[0])
        return f"tl.where({arg} > 0, 1.0, tl.where({arg} < 0, -1.0, 0.0))"

    def _print_Heaviside(self, expr):
        return f"tl.where({self._print(expr.args[0])} > 0, 1.0, 0.0)"

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Exp1(self, expr):
        return repr(float(sympy.E))

    def _print_Pi(self, expr):
        return repr(float(sympy.pi))

    def emptyPrinter(self, expr):
        raise ValueError(f"{type(expr).__name__} ({expr}) has no Triton translation")


def to_triton(expr) -> str:
    return TritonPrinter().doprint(expr)


def _body(outputs: list, names: list[str]) -> list[str]:
    """Lines computing `outputs` with common subexpressions hoisted (sympy.cse)."""
    temps, reduced = sympy.cse(outputs, symbols=sympy.numbered_symbols("e"))
    lines = [f"{sym} = {to_triton(value)}" for sym, value in temps]
    lines += [f"{name} = {to_triton(value)}" for name, value in zip(names, reduced)]
    return lines


# ---- what the templates need ----------------------------------------------------------------

def features_code(variant) -> dict:
    """Code for the feature map (+ LRPE) and its vector-Jacobian product.

    Returned dict (Jinja context):
      parts:         names of the feature tensors one input becomes (["f"] or ["fc", "fs"])
      fwd_args, fwd_lines, fwd_returns    body of _features
      bwd_args, bwd_lines, bwd_returns    body of _features_grad (grad names are 'g' + part)
      phi_text, dphi_text                 phi and phi' for the generated file's docstring
    """
    phi = feature_map(variant.phi)
    t, th = sympy.symbols("t th", real=True)
    if variant.lrpe == "d":
        # LRPE-d (TransNormerLLM): x -> [phi(x) cos(t th), phi(x) sin(t th)], t the absolute position.
        # The kernels hand in cos(t th) and sin(t th) (shared by q and k, from angle addition per chunk)
        cos_t, sin_t = sympy.symbols("cos_t sin_t", real=True)
        rotation = {sympy.cos(t * th): cos_t, sympy.sin(t * th): sin_t}
        parts = {"fc": phi * sympy.cos(t * th), "fs": phi * sympy.sin(t * th)}
        inputs, bwd_inputs, wrt = ["x", "cos_t", "sin_t"], ["x", "t", "cos_t", "sin_t"], {"dx": x, "dth": th}
    else:
        rotation = {}
        parts = {"f": phi}
        inputs, bwd_inputs, wrt = ["x"], ["x"], {"dx": x}
    grads = {name: sympy.Symbol("g" + name) for name in parts}
    vjp = [sum(grads[p] * sympy.diff(expr, var) for p, expr in parts.items()).subs(rotation) for var in wrt.values()]
    fwd = [expr.subs(rotation) for expr in parts.values()]
    return {
        "parts": list(parts),
        "fwd_args": inputs, "fwd_lines": _body(fwd, list(parts)), "fwd_returns": list(parts),
        "bwd_args": bwd_inputs + [str(g) for g in grads.values()],
        "bwd_lines": _body(vjp, list(wrt)), "bwd_returns": list(wrt),
        "phi_text": str(phi), "dphi_text": str(sympy.diff(phi, x)),
        # the features are the inputs as loaded: the kernels may feed the loads to the dots untouched
        "identity": variant.lrpe != "d" and sympy.simplify(phi - x) == 0,
        # phi(0) = 0: padded rows (loaded as zeros) have zero features, no mask needed
        "zero_at_zero": sympy.simplify(phi.subs(x, 0)) == 0,
    }


def decay_code(variant, log2_decay: str, distance: str) -> str:
    """Code for the weight of a pair of tokens `distance` apart: lambda**distance = 2**(log2(lambda)*distance)."""
    if variant.decay == "none":
        return "1.0"
    ld, d = sympy.Symbol(log2_decay), sympy.Symbol(distance)
    return to_triton(2 ** (ld * d))


def gate_code(variant) -> dict:
    """Code for the output gate act(u) and its derivative act'(u) (bodies of _gate and _gate_grad)."""
    act = gate_act(variant.gate)
    return {"fwd_lines": _body([act], ["a"]), "bwd_lines": _body([sympy.diff(act, x)], ["da"]),
            "act_text": str(act), "dact_text": str(sympy.diff(act, x))}

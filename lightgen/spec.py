"""Variant: the symbolic description of one linear-attention kernel family.

A Variant is what the compiler takes as input. It is immutable, validated on
construction, has a canonical text form usable on the command line, e.g.

    decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128

and a stable hash of that canonical form (the generated kernels are cached by it).

Grammar of the text form (comma-separated, order free, whitespace ignored):
    decay=none|constant|scalar|vector   default none (scalar: a log decay per token and head; vector: per
                               token, head and key dim, GLA style; both causal only)
    causal | noncausal         default causal (also causal=true|false)
    lrpe=none|d                default none
    phi=NAME|EXPR              a known name (identity, silu, elu+1, relu) or a sympy
                               expression in x, e.g. phi=x**2 or phi=1+elu(x); default identity
    dk=INT, dv=INT             head dims: powers of two in 16..256 (required)
    scale=FLOAT                multiplies q·k; default dk**-0.5
    norm=none|srms             fused epilogue: SRMSNorm of each head's output row, o / sqrt(mean(o**2) + eps),
                               no learned scale; default none
    eps=FLOAT                  the norm's eps (norm=srms only); default 1e-6 (TransNormerLLM's)
    gate=none|NAME|EXPR        fused epilogue: the output times act(u), u an input like v; act a known name
                               (identity, sigmoid, silu) or a sympy expression in x like phi; default none
Commas inside parentheses belong to the expression: phi=Max(x,0) works.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

DECAYS = ("none", "constant", "scalar", "vector")
LRPES = ("none", "d")
NORMS = ("none", "srms")
DEFAULT_EPS = 1e-6  # TransNormerLLM's SRMSNorm eps
KEYS = "decay, causal, lrpe, phi, dk, dv, scale, norm, eps, gate"
HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Variant:
    dk: int
    dv: int
    decay: str = "none"
    causal: bool = True
    lrpe: str = "none"
    phi: str = "identity"
    scale: float | None = None
    norm: str = "none"
    eps: float | None = None  # norm=srms only; DEFAULT_EPS when omitted
    gate: str = "none"
    # canonical sympy text of phi (and of the gate's act), filled in by __post_init__ (part of the hash)
    phi_expr: str = field(default="", compare=False, repr=False)
    gate_expr: str = field(default="", compare=False, repr=False)

    def __post_init__(self):
        from .symbolic import feature_map  # late import: sympy is only needed here

        for name in ("dk", "dv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in HEAD_DIMS:
                raise ValueError(f"{name}={value!r}: expected a power of two in 16..256 ({', '.join(map(str, HEAD_DIMS))})")
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r}: expected one of {', '.join(DECAYS)}")
        if self.learned_decay and self.causal is False:
            # o_t = sum over s <= t of exp(G_t - G_s) ...: a data-dependent decay runs forward in time, and
            # its two-sided form (and that form's gradient) is not the same definition everywhere
            raise ValueError(f"decay={self.decay}: causal only (the per-token decay of Mamba2 / GLA is "
                             "defined for s <= t); use decay=constant for non-causal attention")
        if self.lrpe not in LRPES:
            raise ValueError(f"lrpe={self.lrpe!r}: expected one of {', '.join(LRPES)}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal={self.causal!r}: expected a bool")
        scale = self.dk ** -0.5 if self.scale is None else self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale={self.scale!r}: expected a positive finite float")
        object.__setattr__(self, "scale", float(scale))
        object.__setattr__(self, "phi_expr", str(feature_map(self.phi)))
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {', '.join(NORMS)}")
        if self.norm == "none" and self.eps is not None:
            raise ValueError(f"eps={self.eps!r}: the norm's eps, but the variant has norm=none (use norm=srms)")
        if self.norm == "srms":
            eps = DEFAULT_EPS if self.eps is None else self.eps
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
                raise ValueError(f"eps={self.eps!r}: expected a positive finite float")
            object.__setattr__(self, "eps", float(eps))
        if self.gate != "none":
            from .symbolic import gate_act

            object.__setattr__(self, "gate_expr", str(gate_act(self.gate)))

    # ---- text form -------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """Build a Variant from its text form (see the module docstring)."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"spec={spec!r}: expected text like 'decay=constant,causal,dk=64,dv=64'")
        fields: dict = {}
        for item in _split_top_level(spec):
            key, sep, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if key in ("causal", "noncausal") and not sep:
                fields["causal"] = key == "causal"
            elif key == "causal":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"spec item {item!r}: causal expects true or false")
                fields["causal"] = value.lower() in ("true", "1", "yes")
            elif not sep or not value:
                raise ValueError(f"spec item {item!r}: expected key=value (keys: {KEYS})")
            elif key in ("dk", "dv"):
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise ValueError(f"spec item {item!r}: {key} expects an integer") from None
            elif key in ("scale", "eps"):
                try:
                    fields[key] = float(value)
                except ValueError:
                    raise ValueError(f"spec item {item!r}: {key} expects a number") from None
            elif key in ("decay", "lrpe", "phi", "norm", "gate"):
                fields[key] = value
            else:
                raise ValueError(f"spec item {item!r}: unknown key {key!r} (keys: {KEYS})")
        for required in ("dk", "dv"):
            if required not in fields:
                raise ValueError(f"spec={spec!r}: missing {required}=INT")
        return cls(**fields)

    def canonical(self) -> str:
        parts = [f"decay={self.decay}", "causal" if self.causal else "noncausal", f"lrpe={self.lrpe}",
                 f"phi={self.phi_name}", f"dk={self.dk}", f"dv={self.dv}", f"scale={self.scale!r}"]
        # the epilogue keys appear only when used: variants without one keep their text and hash
        if self.norm != "none":
            parts += [f"norm={self.norm}", f"eps={self.eps!r}"]
        if self.gate != "none":
            parts.append(f"gate={self.gate_name}")
        return ",".join(parts)

    __str__ = canonical

    @property
    def phi_name(self) -> str:
        """The known name when phi is one, else the canonical sympy text."""
        from .symbolic import KNOWN_FEATURE_MAPS

        return self.phi if self.phi in KNOWN_FEATURE_MAPS else self.phi_expr

    @property
    def gate_name(self) -> str:
        """The gate's known name when it is one (or none), else the canonical sympy text of act."""
        from .symbolic import KNOWN_GATES

        return self.gate if self.gate in KNOWN_GATES or self.gate == "none" else self.gate_expr

    @property
    def state_rows(self) -> int:
        """F, the rows of a head's [F, dv] state: dk, or 2 dk under LRPE (the cos half, then the sin half)."""
        return self.dk * (2 if self.lrpe == "d" else 1)

    @property
    def whole_state(self) -> bool:
        """Whether every row sees the whole sequence through one state (non-causal without decay): its kernels sum
        that state in one walk and apply it in another, and a long sequence's pieces sum their own states."""
        return not self.causal and self.decay == "none"

    @property
    def two_sided(self) -> bool:
        """Whether each row sees both directions through decayed states (non-causal with a decay): its kernels walk
        forward inclusive, then reverse strict, and a long sequence's pieces are each handed a state from each side."""
        return not self.causal and self.decay != "none"

    @property
    def learned_decay(self) -> bool:
        """Whether the decay is an input per token, g, with a gradient (decay=scalar or vector)."""
        return self.decay in ("scalar", "vector")

    @property
    def epilogue(self) -> bool:
        """Whether the forward kernel applies a norm and / or a gate to its output."""
        return self.norm != "none" or self.gate != "none"

    @property
    def without_epilogue(self) -> "Variant":
        """The same attention without norm and gate (what the fused epilogue is applied to)."""
        return dataclasses.replace(self, norm="none", eps=None, gate="none")

    @property
    def hash(self) -> str:
        # phi_expr (not the name) is hashed: 'silu' and 'x/(1+exp(-x))' are the same kernel; the same for the gate.
        text = self.canonical().replace(f"phi={self.phi_name}", f"phi={self.phi_expr}")
        if self.gate != "none":
            text = text.replace(f"gate={self.gate_name}", f"gate={self.gate_expr}")
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def slug(self) -> str:
        """Short readable file-name stem."""
        return (f"{'causal' if self.causal else 'noncausal'}_{self.decay}_lrpe{self.lrpe}_"
                f"dk{self.dk}_dv{self.dv}" + ("_epilogue" if self.epilogue else ""))


def as_variant(spec) -> Variant:
    if isinstance(spec, Variant):
        return spec
    if isinstance(spec, str):
        return Variant.parse(spec)
    raise TypeError(f"variant={spec!r}: expected a lightgen.Variant or a spec string")


def _split_top_level(spec: str) -> list[str]:
    """Split at commas that are not inside parentheses."""
    items, depth, current = [], 0, []
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"spec={spec!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"spec={spec!r}: unbalanced '('")
    items.append("".join(current))
    items = [item.strip() for item in items]
    if any(not item for item in items):
        raise ValueError(f"spec={spec!r}: empty item (stray comma?)")
    return items


def tnl_slopes(heads: int) -> list[float]:
    """TransNormerLLM / ALiBi decay rates s_h (lambda_h = exp(-s_h)): 2^(-8(h+1)/H) for H a power of
    two; otherwise the ALiBi rule (those of the power of two below, then every other of the one above)."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads={heads!r}: expected a positive int")

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if heads & (heads - 1) == 0:
        return power_of_two(heads)
    below = 1 << (heads.bit_length() - 1)
    return power_of_two(below) + tnl_slopes(2 * below)[0::2][: heads - below]

"""Jinja rendering: a Variant plus its symbolic pieces -> the source text of its kernel module."""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

import jinja2

from . import __version__
from .spec import Variant
from .symbolic import decay_code, features_code, gate_code

MAIN_TEMPLATE = "kernels.py.j2"
# a variant's kernel modules: (template, packed sequences?). Each is its own file with its own key, so
# that adding one leaves the others' source (and their tuned configs' key) unchanged.
MODULES = {
    "main": (MAIN_TEMPLATE, False),
    "varlen": (MAIN_TEMPLATE, True),  # packed sequences (cu_seqlens)
    "pieces": ("pieces.py.j2", False),  # sequence splitting's state passes
    "varlen_pieces": ("pieces.py.j2", True),  # the same for packed sequences cut into pieces
}


def template_dir() -> Path:
    """templates/ ships inside the wheel as lightgen/templates; in a source checkout it sits beside lightgen/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / MAIN_TEMPLATE).is_file():
            return candidate
    raise FileNotFoundError(f"lightgen templates not found next to {here}; reinstall lightgen")


def source_key(variant: Variant, templates: Path | None = None, module: str = "main") -> str:
    """Hash of the generated module's source itself: it names the cached file (tuned launch configs are
    keyed per kernel, kernel_key)."""
    templates = templates or template_dir()
    return _rendered_key(variant, str(templates), _templates_state(templates), module)


def kernel_key(variant: Variant, kernel: str, templates: Path | None = None) -> str:
    """Hash of one kernel's generated code in the main module: its function, and what every kernel shares
    (imports, constants, the helper functions), but not the module's docstring or its other kernels.
    Tuned launch configs are keyed by it, so a template edit keeps the tuned entries of every kernel it
    leaves as it was. (The varlen module's kernels take the main ones' entries.)"""
    templates = templates or template_dir()
    return _kernel_key(variant, str(templates), _templates_state(templates), kernel)


@functools.lru_cache(maxsize=512)
def _kernel_key(variant: Variant, templates: str, templates_digest: str, kernel: str) -> str:
    source = render(variant, Path(templates), "main")
    lines = source.splitlines(keepends=True)
    shared, own = [], None
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module's docstring
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "".join(lines[first - 1:node.end_lineno])
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            if node.name == kernel:
                own = text
        else:
            shared.append(text)
    if own is None:
        raise ValueError(f"kernel={kernel!r}: the {variant} module has no such kernel")
    return hashlib.sha256("".join(shared + [own]).encode()).hexdigest()[:20]


def _templates_state(templates: Path) -> str:
    """The templates' digest. Stats them (cheap, on every call) and re-reads and hashes them only when they changed."""
    stats = [(p.name, p.stat()) for p in sorted(templates.glob("*.j2"))]
    stamps = tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    return _templates_digest(str(templates), stamps)


@functools.lru_cache(maxsize=16)
def _templates_digest(templates: str, stamps: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        digest.update(name.encode() + b"\0" + (Path(templates) / name).read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=512)
def _rendered_key(variant: Variant, templates: str, templates_digest: str, module: str) -> str:
    return hashlib.sha256(render(variant, Path(templates), module).encode()).hexdigest()[:20]


def kernel_spec(variant: Variant) -> str:
    """The variant as its kernels see it: the canonical spec less the scale, a run-time argument (left out
    of the source, so that one set of kernels and tuned entries serves every scale)."""
    return ",".join(p for p in variant.canonical().split(",") if not p.startswith("scale="))


def render(variant: Variant, templates: Path | None = None, module: str = "main") -> str:
    """The source of one of the variant's kernel modules (MODULES): "main" (forward, backward, decode
    step), "varlen" (the same for packed sequences), "pieces" (sequence splitting's state passes) or
    "varlen_pieces" (the same for packed sequences)."""
    if module not in MODULES:
        raise ValueError(f"module={module!r}: expected one of {', '.join(MODULES)}")
    template, varlen = MODULES[module]
    templates = templates or template_dir()
    env = _environment(str(templates))
    feats = features_code(variant)
    gate = gate_code(variant) if variant.gate != "none" else None
    lrpe = variant.lrpe == "d"
    # whether bwd_dq / bwd_dk's transposed chain (kernels.py.j2's tout: constant decay or none, no LRPE) loads its
    # input itself (chain); under the identity the chain reads nothing of it
    late_chain = variant.decay in ("constant", "none") and not lrpe and not feats["identity"]
    # whether the printed math calls the _sigmoid helper: rendered only then, since a helper in the module is part
    # of every kernel's key (kernel_key) and would move the tuned entries of variants that never call it
    printed = feats["fwd_lines"] + feats["bwd_lines"] + (gate["fwd_lines"] + gate["bwd_lines"] if gate else [])
    sigmoid = any("_sigmoid(" in line for line in printed)

    def parts(x):
        return [f"{x}_{p}" for p in feats["parts"]]

    def features(x):
        args = f"{x}, cos_t, sin_t" if lrpe else x
        return f"{', '.join(parts(x))} = _features({args})"

    def rotation_start(reverse):
        """LRPE, before a walk's loop: cos and sin of the angle of its first chunk's first row (the
        walk runs forward, or backward over the rows in a reverse walk)."""
        if not lrpe:
            return []
        first = "N - 1 - t_first" if reverse else "t_first"
        return [f"cos_first, sin_first = _cos_sin({first} + pos0, th)  # the first chunk's first row (padded rows included)"]

    def rotation(reverse):
        """LRPE, in the loop: each row's position t and cos_t, sin_t = cos(t th), sin(t th), by angle addition
        from the chunk's first row and the prologue's rot_c, rot_s = cos(r th), sin(r th). The first row's
        angle then moves C rows on by one more angle addition (the prologue's step_c, step_s = cos(C th),
        sin(C th)): no sin or cos in the loop. Each sin and cos of a large argument takes tens of instructions
        of range reduction, and in the loop they were most of a chunk's elementwise work. The rotated pair is
        renormalized to length 1 (one Newton step), so rounding does not grow its magnitude over the chunks."""
        if not lrpe:
            return []
        plus, minus = ("-", "+") if reverse else ("+", "-")
        return ["t = (rows + pos0).to(tl.float32)[:, None]  # LRPE angle: absolute position",
                f"cos_t = cos_first * rot_c {minus} sin_first * rot_s",
                f"sin_t = sin_first * rot_c {plus} cos_first * rot_s",
                f"cos_first, sin_first = cos_first * step_c {minus} sin_first * step_s, sin_first * step_c {plus} cos_first * step_s",
                "unit = 1.5 - 0.5 * (cos_first * cos_first + sin_first * sin_first)",
                "cos_first, sin_first = cos_first * unit, sin_first * unit"]

    def scaled(x):
        return f"{', '.join(parts(x))} = {', '.join(p + ' * scale' for p in parts(x))}"

    def masked(x):
        # padded rows load zeros, but phi(0) need not be 0: keep them out of the state. (decay=vector keeps
        # its masks, one where per operand beside its per-feature weights: its kernels stay the tuned ones)
        if feats["zero_at_zero"] and variant.decay != "vector":
            return []
        return [f"{p} = tl.where(mask[:, None], {p}, 0.0)" for p in parts(x)]

    def chain(x, source, factor, transposed=False):
        """The input's gradient from its features' (out_<part>); transposed: those are [dim, C] (never under LRPE).
        A transposed chain through a feature map loads its input itself, [tile, C] as its output is stored, where
        it is used (the walk does not load it: see late_chain). Held from the loop's top and transposed there, the
        fp32 input spilled: H100, silu, D = 128, bf16, 4K, ms: bwd_dq 0.612 against 0.728, bwd_dk 0.621 against
        0.671 (each's best of 5 configs); tuned, 0.606 and 0.613 without spills (0.69-0.74 and 0.66-0.71 before)."""
        grads = ", ".join(f"{factor}out_{p}" for p in parts(source))
        if transposed and late_chain:
            return [f"{x}_t = tl.load({x}_ptr + rows[None, :] * H * DK + tile[:, None], mask=mask[None, :], other=0.0)"
                    ".to(tl.float32)",
                    f"d{x} = _features_grad({x}_t, {grads})"]
        if transposed:  # the identity: the chain reads nothing of x
            return [f"d{x} = _features_grad(tl.trans({x}), {grads})"]
        if lrpe:
            return [f"d{x}, dth = _features_grad({x}, t, cos_t, sin_t, {grads})",
                    "dth_acc += tl.sum(tl.where(mask[:, None], dth, 0.0), axis=0)"]
        return [f"d{x} = _features_grad({x}, {grads})"]

    def decay_grad(x, source, factor):
        """decay=scalar: this kernel's part of dL/dG_t per row, G_t the cumulative log decay:
        +-f(x).df(x), df(x) = the gradient of the features as they enter the products (factor * out).
        decay=vector: the same per key dim, +-f(x) * df(x), on the kernel's dk tile."""
        sign = "minus " if factor.startswith("-") else ""
        if variant.decay == "vector":  # per key dim: the products, not their sums (LRPE: both halves of dim i)
            prods = " + ".join(f"{p} * out_{s}" for p, s in zip(parts(x), parts(source)))
            lines = [f"# this kernel's part of dL/dG (G the cumulative log decay per dim): {sign}f({x}) * df({x})",
                     f"dG = {factor}({prods})",
                     "dg_offs = dg_ptr + rows[:, None] * H * DK + tile[None, :]"]
            if x == "k":  # bwd_dk runs after bwd_dq, whose part it finds in DG: the sum, without a pass in torch
                lines.append("dG += tl.load(dg_offs, mask=mask[:, None], other=0.0)")
            return lines + ["tl.store(dg_offs, dG, mask=mask[:, None])"]
        dots = " + ".join(f"tl.sum({p} * out_{s}, axis=1)" for p, s in zip(parts(x), parts(source)))
        return [f"# this kernel's part of dL/dG (G the cumulative log decay): {sign}f({x}) . df({x}) per row",
                f"dG = {factor}({dots})", "tl.store(dg_ptr + rows * H, dG, mask=mask)"]

    def store(ptr, row_stride, cols, value, tensor, accumulate, transposed=False):
        """Store a [C, cols] tile, or (transposed) a [cols, C] one as it is: a transposed walk's output."""
        row, col, rmask = ("[None, :]", "[:, None]", "mask[None, :]") if transposed else ("[:, None]", "[None, :]", "mask[:, None]")
        lines = [f"offs = {ptr} + rows{row} * {row_stride} + {cols}{col}"]
        if accumulate:  # second walk of a non-causal kernel adds to the first's result
            lines.append(f"{value} += tl.load(offs, mask={rmask}, other=0.0).to(tl.float32)")
        lines.append(f"tl.store(offs, {value}.to({tensor}.dtype.element_ty), mask={rmask})")
        return lines

    def state_ptrs(base, b, c, spec, transposed=False):
        """Pointers to the block of a [F, DV] fp32 state that the walk's S_b_c holds (F = dk per feature part):
        [b rows, c columns], or [c, b] for a walk that holds its states transposed."""
        feature = b if spec["side"] == "b" else c
        part = feats["parts"].index(feature.split("_", 1)[1])
        rows = f"({part} * DK + {spec['feat_cols']})" if part else spec["feat_cols"]
        if (spec["side"] == "b") != transposed:  # the feature rows down the block
            return f"{base} + {rows}[:, None] * DV + {spec['v_cols']}[None, :]"
        return f"{base} + {rows}[None, :] * DV + {spec['v_cols']}[:, None]"

    def output_epilogue():
        """The fused epilogue on the finished output rows out_v (fp32; under norm=srms the tile is the
        whole row): Y = SRMSNorm(o) * act(u). o itself is already stored (the backward needs it)."""
        lines = ["# fused epilogue: " + " then ".join(
            (["y = o / sqrt(mean(o**2) + eps) (the tile is the whole row)"] if variant.norm == "srms" else [])
            + (["y * act(u)"] if variant.gate != "none" else []))]
        if variant.norm == "srms":
            lines.append(f"out_v = out_v * (1.0 / tl.sqrt(tl.sum(out_v * out_v, axis=1) / DV + {variant.eps!r}))[:, None]")
        if variant.gate != "none":
            lines.append("u = tl.load(u_ptr + rows[:, None] * H * DV + tile[None, :], mask=mask[:, None], other=0.0)")
            lines.append("out_v = out_v * _gate(u.to(tl.float32))")
        return lines + store("y_ptr", "H * DV", "tile", "out_v", "Y", False)

    return env.get_template(template).render(
        variant=variant, kernel_spec=kernel_spec(variant), version=__version__, feats=feats, varlen=varlen,
        decay=variant.decay != "none", constant=variant.decay == "constant", scalar=variant.decay == "scalar",
        vector=variant.decay == "vector",
        lrpe=lrpe, decay_grad=decay_grad, late_chain=late_chain,
        # q and k loaded in fp32 for the feature map; as loaded (fp16 / bf16) when it is the identity, so that
        # the dots read them straight from the loads (decay=vector: always fp32, for its per-feature weights)
        upcast=variant.decay == "vector" or not feats["identity"],
        # the operands the feature map computes (none: q and k go to the products as loaded)
        computed=[] if feats["identity"] else parts("q") + parts("k"),
        epilogue=variant.epilogue, gate=gate, sigmoid=sigmoid,
        output_epilogue=output_epilogue,
        state_rows="2 * DK" if lrpe else "DK", state_ptrs=state_ptrs,
        vector_scaled=lambda x: [scaled(x)] if variant.decay == "vector" else [],
        parts=parts, features=features, rotation=rotation, rotation_start=rotation_start, scaled=scaled, masked=masked, chain=chain, store=store,
        zip_parts=lambda a, b: list(zip(parts(a), parts(b))),
        decay_weight=lambda ld, dist: decay_code(variant, ld, dist),
    )


@functools.lru_cache(maxsize=4)
def _environment(path: str) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(path), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)

"""Generated files: rendered once per source key, re-rendered when a template changes or a file is damaged."""
import os
import shutil

import pytest

import lightgen
from lightgen import build, render

SPEC = "decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=16"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTGEN_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(build, "_loaded", {})
    calls = []
    original = build.render

    def counting_render(variant, templates=None, module="main"):
        calls.append(variant)
        return original(variant, templates, module)

    monkeypatch.setattr(build, "render", counting_render)
    return calls


def test_rendered_once_and_reused_across_processes(fresh_cache):
    variant = lightgen.Variant.parse(SPEC)
    first = build.load(variant)
    assert build.load(variant) is first and len(fresh_cache) == 1
    build._loaded.clear()  # as a new process would: the file is there, nothing is rendered
    build.load(variant)
    assert len(fresh_cache) == 1
    path = build.kernel_path(variant)
    assert path.parent == build.cache_dir() and path.name.endswith(".py")
    assert "def fwd(" in path.read_text() and "def bwd_dq(" in path.read_text()


def test_damaged_file_is_regenerated_not_imported(fresh_cache):
    variant = lightgen.Variant.parse(SPEC)
    path = build.ensure_source(variant)
    good = path.read_text()
    path.write_text(good.replace("tl.exp2", "tl.exp"))  # an edit keeps it valid Python but wrong
    with pytest.warns(UserWarning, match="damaged"):
        build.ensure_source(variant)
    assert path.read_text() == good
    path.write_text(good[: len(good) // 2])  # truncated
    with pytest.warns(UserWarning, match="damaged"):
        build.load(variant)
    assert path.read_text() == good and len(fresh_cache) == 3


def test_changed_template_regenerates(fresh_cache, tmp_path, monkeypatch):
    variant = lightgen.Variant.parse(SPEC)
    templates = tmp_path / "templates"
    shutil.copytree(render.template_dir(), templates)
    monkeypatch.setattr(render, "template_dir", lambda: templates)
    before = build.kernel_path(variant)
    build.load(variant)
    main = templates / render.MAIN_TEMPLATE
    main.write_text(main.read_text().replace("do not edit;", "do not edit (changed template);"))
    after = build.kernel_path(variant)
    assert after != before
    build._loaded.clear()  # as a new process would (a live one keeps the module it loaded)
    build.load(variant)
    assert len(fresh_cache) == 2 and "changed template" in after.read_text()


def test_source_is_printable():
    attn = lightgen.compile(SPEC)
    text = attn.source()
    assert render.kernel_spec(attn.variant) in text and "_features_grad" in text
    assert "scale=" not in text  # a run-time argument: the same kernels serve every scale
    compile(text, str(attn.source_path), "exec")  # valid Python


def test_importing_lightgen_leaves_triton_unimported():
    """The CLI picks Triton's interpreter (TRITON_INTERPRET=1) after importing lightgen, and Triton reads
    that setting when it is first imported: lightgen must import it only when a kernel runs."""
    import subprocess
    import sys

    code = "import sys, lightgen, lightgen.cli; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items()
                                                                     if k != "TRITON_INTERPRET"})

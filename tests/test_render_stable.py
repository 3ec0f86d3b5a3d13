"""Branch guard: template work for a new variant leaves the generated source of the existing variants
byte for byte as it was, so their tuned launch configs (keyed by render.source_key) stay valid.

Renders each variant with this checkout and with the lightgen of a base revision (git archive of
lightgen/ and templates/ at LIGHTGEN_RENDER_BASE, default: the merge base with main) and compares.
Skipped outside a git checkout or when the base revision is unknown.
"""
import itertools
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lightgen import render
from lightgen.spec import Variant

ROOT = Path(__file__).resolve().parent.parent
SPECS = [f"decay={decay},{causal},lrpe={lrpe},phi={phi},dk={dk},dv={dv},scale=1"
         for decay, causal, lrpe, (phi, dk, dv) in itertools.product(
             ["none", "constant"], ["causal", "noncausal"], ["none", "d"],
             [("identity", 128, 128), ("silu", 64, 32), ("elu+1", 16, 64)])]


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def base_sources(tmp_path_factory):
    try:
        base = os.environ.get("LIGHTGEN_RENDER_BASE") or _git("merge-base", "HEAD", "main")
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", base, "lightgen", "templates"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no base revision to compare with: {err}")
    tree = tmp_path_factory.mktemp("base")
    (tree / "base.tar").write_bytes(archive)
    with tarfile.open(tree / "base.tar") as tar:
        tar.extractall(tree, filter="data")
    script = ("import json, sys\nfrom lightgen.render import render\nfrom lightgen.spec import Variant\n"
              "print(json.dumps({s: render(Variant.parse(s)) for s in sys.argv[1:]}))")
    out = subprocess.run([sys.executable, "-c", script, *SPECS], cwd=tree, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(tree)}).stdout
    import json

    return json.loads(out)


@pytest.mark.parametrize("spec", SPECS)
def test_existing_variants_render_as_before(spec, base_sources):
    assert render.render(Variant.parse(spec)) == base_sources[spec], f"{spec}: generated source changed"

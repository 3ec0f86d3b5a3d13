"""Test setup: without a GPU the kernels run under Triton's interpreter (set before any kernel import).

On a CUDA machine the same tests run the compiled kernels in bf16 and fp16; on the CPU in fp32 and
fp16 (the interpreter's bf16 tl.dot is wrong, so bf16 is tested on the GPU only).
"""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a fresh kernel cache per test session: tests never read files an older lightgen wrote; the same for
# torch.compile's cache, whose entries keep the custom ops' call signatures of the lightgen that wrote them
os.environ.setdefault("LIGHTGEN_CACHE_DIR", tempfile.mkdtemp(prefix="lightgen-test-cache-"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lightgen-test-inductor-"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.float16]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Empty user and shipped tuned-config stores, both private to the test."""
    from lightgen import configs

    user, shipped = tmp_path / "user", tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("LIGHTGEN_TUNED_DIR", str(user))
    monkeypatch.setattr(configs, "shipped_dir", lambda: shipped)
    return user, shipped


@pytest.fixture(scope="session")
def corpus_dir():
    """The tnl training corpus folder (downloaded once); skips where it cannot be had."""
    from tnl import data

    try:
        data.load_corpus()
    except data.CorpusUnavailable as e:
        pytest.skip(f"corpus not cached and not downloadable: {e}")
    return str(data.data_dir())


# a kernel with a run-time loop bound, as every lightgen kernel has
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(X, N):
    for i in range(0, N):
        tl.store(X + i, i)

x = torch.zeros(3)
count[(1,)](x, 3)
assert x.tolist() == [0.0, 1.0, 2.0], x
"""


@pytest.fixture(scope="session")
def interpreter(tmp_path_factory):
    """For the tests that run kernels under Triton's interpreter on purpose, also on a GPU machine (tuner dry
    runs, CPU ranks): skips them where the interpreter cannot run our kernels. Triton 3.6's fails with numpy
    2.4 ("only 0-dimensional arrays can be converted to Python scalars"), and the H100 image has both."""
    probe = tmp_path_factory.mktemp("interpreter") / "probe.py"
    probe.write_text(_INTERPRETER_PROBE)
    done = subprocess.run([sys.executable, str(probe)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        pytest.skip(f"Triton's interpreter cannot run a kernel here: {lines[-1]}")


@pytest.fixture(autouse=True)
def dense_kernel_arguments(monkeypatch):
    """Every test's kernel launches get only contiguous tensors: the kernels address each as dense rows, and a
    view with other strides (an expand's 0) is read wrongly, or past its storage, with no error (session 24: one
    sequence's whole state handed as a stride-0 view, an illegal address on the H100 only). Checked here, not on
    each launch: a few microseconds of host time per launch."""
    from lightgen import ops

    unchecked = ops._launch  # (not `launch`: that names lightgen.launch everywhere else)

    def checked(module, variant, kernel, q, tile_name, args, *rest, **kwargs):
        for i, a in enumerate(args):
            tensor = a.total if isinstance(a, ops.TileShares) else a
            if isinstance(tensor, torch.Tensor):
                assert tensor.is_contiguous(), f"{kernel}: argument {i} {tuple(tensor.shape)} has strides {tensor.stride()}"
        return unchecked(module, variant, kernel, q, tile_name, args, *rest, **kwargs)

    monkeypatch.setattr(ops, "_launch", checked)

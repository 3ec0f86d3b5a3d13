"""lightgen inspect: the kernels compiled for a GPU arch without that GPU (lightgen/resources.py).

The compiles run in a child process without TRITON_INTERPRET (this process's kernels may be the
interpreter's); each takes a few seconds per kernel.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from lightgen import configs, launch, ops, render, resources
from lightgen.spec import Variant

TNL64 = "decay=constant,causal,dk=64,dv=64"


def _inspect(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "lightgen.cli", "inspect", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


def _rows(stdout):
    """kernel -> its row's cells by column name."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    head = lines[at].split()
    head = head[:head.index("smem")] + ["smem"] + head[head.index("KB") + 1:]  # "smem KB" is one column
    rows = {}
    for line in lines[at + 1:]:
        cells = line.split(None, len(head) - 1)
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def test_inspect_compiles_every_kernel_for_sm90_with_its_tuned_config():
    code, out, err = _inspect(TNL64, "--arch", "sm90", "--seqlen", "4k")
    assert code == 0, err
    rows = _rows(out)
    variant = Variant.parse(TNL64)
    assert list(rows) == [*launch.kernels(variant), "fwd_state", "bwd_state"]  # and the causal state passes
    for kernel, row in rows.items():
        # the launch config is the shipped sm90 entry of this kernel's code at 4K, as a launch on an H100 takes it;
        # a state pass's is that of the kernel it borrows from, at most 4 warps
        tuned = launch.BORROWED.get(kernel, kernel)
        entry = configs.lookup_entry("sm90", "NVIDIA H100 80GB HBM3", "3.6", render.kernel_key(variant, tuned),
                                     tuned, 64, 64, torch.bfloat16, 4096)
        assert entry is not None and row["config"].startswith("tuned (NVIDIA H100 80GB HBM3, Triton 3.6)")
        want = launch.state_pass_params(variant, entry["params"]) if kernel in launch.BORROWED else entry["params"]
        assert {p: int(row[p.replace("num_", "")]) for p in launch.PARAM_NAMES} == want
        assert 0 < int(row["regs"]) <= 255 and int(row["stack"]) >= 0 and float(row["smem"]) > 0
        assert int(row["HGMMA"]) > 0  # Hopper's wgmma: the 64-token products of every kernel
    assert rows["fwd_state"]["warps"] == "4" and rows["fwd_state"]["config"].endswith("as fwd's")


def test_inspect_compiles_the_state_passes_of_a_noncausal_decayed_variant():
    """A non-causal variant with a decay has state passes too (a long sequence's pieces are handed a state from
    each side): record_launches takes them from a forward + backward cut in two, the forward's k-v passes with the
    scale 1, and inspect compiles them as it does a causal variant's."""
    spec = "decay=constant,noncausal,dk=64,dv=64"
    launches = ops.record_launches(ops.compile(spec), *(torch.zeros(1, 64, 2, 64) for _ in range(4)))
    assert {"fwd_state", "bwd_state"} <= set(launches)
    assert [launches[k][1]["scale"] for k in ("fwd_state", "bwd_state")] == [1.0, 1.0]
    assert launches["fwd"][1]["scale"] is None  # (the kernels' own: the variant's)
    code, out, err = _inspect(spec, "--arch", "sm90", "--kernels", "fwd_state,bwd_state")
    assert code == 0, err
    rows = _rows(out)
    assert list(rows) == ["fwd_state", "bwd_state"] and rows["bwd_state"]["config"].endswith("as bwd_dv's")
    assert all(int(row["HGMMA"]) > 0 and row["stack"] == "0" for row in rows.values())


def test_inspect_names_the_arch_it_compiled_for_and_takes_a_given_config(tmp_path):
    code, out, err = _inspect(TNL64, "--arch", "sm80", "--kernels", "fwd", "--config", "C=32,num_warps=4",
                              "--dump", str(tmp_path))
    assert code == 0, err
    row = _rows(out)["fwd"]
    assert row["config"] == "given" and row["C"] == "32" and row["warps"] == "4"
    assert row["HGMMA"] == "0" and int(row["HMMA"]) > 0  # no wgmma before Hopper: mma.sync
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fwd.ptx", "fwd.sass", "fwd.ttgir"]
    assert re.search(r"\.target sm_80", (tmp_path / "fwd.ptx").read_text())


@pytest.mark.parametrize("args, message", [
    (["--arch", "gfx942"], "arch='gfx942': expected a CUDA arch like sm80"),
    (["--kernels", "fwd,bwd"], "kernels: bwd: expected names from fwd, bwd_dq"),
    (["--config", "C=32,tile=64"], "config: unknown tile: expected names from C, BK, BV"),
    (["--config", "C=24"], "config: C=24 is not a power of two"),
    (["--config", "C=big"], "--config: 'C=big' is not NAME=INTEGER"),
])
def test_inspect_names_a_bad_argument(args, message):
    code, _, err = _inspect(TNL64, *args)
    assert code == 2 and message in err


def test_inspect_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        resources.inspect(TNL64)


def test_launch_config_takes_the_heuristic_where_the_arch_has_no_entry():
    variant = Variant.parse(TNL64)
    params, source = resources.launch_config(variant, "fwd", "sm100", torch.bfloat16, 4096)
    assert (params, source) == (launch.heuristic(variant, "fwd", interpreted=False), "heuristic")


def test_the_heuristic_compiles_without_spills_where_gpus_have_only_mma_sync():
    """launch.heuristic's A100 rule at D = 128, as compiled for sm80 (the H100's 64-token chunks spilled 320-384
    bytes a thread there): the kernels an untuned A100 runs spill nothing, the fused backward's bwd_dkv left out
    (it takes the split one)."""
    code, out, err = _inspect("decay=constant,causal,dk=128,dv=128", "--arch", "sm80",
                              "--kernels", "fwd,bwd_dq,bwd_dk,bwd_dv")
    assert code == 0, err
    rows = _rows(out)
    assert {k: (row["C"], row["config"]) for k, row in rows.items()} == {k: ("32", "heuristic") for k in rows}
    assert {k: row["stack"] for k, row in rows.items()} == {k: "0" for k in rows}
    assert {k: row["HGMMA"] for k, row in rows.items()} == {k: "0" for k in rows}

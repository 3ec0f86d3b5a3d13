"""lightgen.bench's table rows on the CPU (the timings themselves need a GPU)."""
import pytest
import torch

import lightgen

from lightgen import bench


def test_a_row_gives_eager_and_graph_times_and_the_speedups(capsys):
    row = {"N": 4096, "B": 16, "floor_fwd_ms": 0.5, "floor_fwdbwd_ms": 1.0,
           "lightgen": {"fwd_ms": 1.0, "fwdbwd_ms": 2.0, "graph": {"fwd_ms": 0.8, "fwdbwd_ms": 1.5},
                        "kernels": {"bwd_dkv": {"ms": 0.9, "launches": 1}, "scan": {"ms": 0.1, "launches": 2}}},
           "fla": {"fwd_ms": 2.0, "fwdbwd_ms": 5.0, "graph": {"fwd_ms": 1.6, "fwdbwd_ms": 4.5}},
           "lightning_attn": {"fwd_ms": 3.0, "fwdbwd_ms": 6.0, "graph_error": "RuntimeError: capture failed"}}
    bench._print_row(row)
    line, kernels = capsys.readouterr().out.splitlines()
    lightgen, fla, lightning = line.split(" | ")[1:]
    assert "1.000/2.000 (2.00x/2.00x floor; graph 0.800/1.500)" in lightgen
    assert "ours 2.00x/2.50x faster; graph 1.600/4.500, ours 2.00x/3.00x faster" in fla
    assert "ours 3.00x/3.00x faster; no CUDA graph: RuntimeError: capture failed" in lightning
    assert kernels.endswith("(GPU ms): bwd_dkv 0.900, scan 0.100 (x2); sum 1.000 of 2.000 eager")


def test_kernel_times_are_per_call_and_slowest_first():
    long_name = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"
    events = [("fwd", 300.0), ("scan", 5.0), ("scan", 7.0), (long_name, 1.0), ("bwd_dkv", 700.0)] * 2
    table = bench.tally(events, calls=2)
    assert list(table) == ["bwd_dkv", "fwd", "scan", long_name[:60]]
    assert table["bwd_dkv"] == {"ms": pytest.approx(0.7), "launches": 1}
    assert table["scan"] == {"ms": pytest.approx(0.012), "launches": 2}


def test_the_sdpa_peer_is_causal_as_the_variant():
    """SDPA attends over the rows the variant does: a non-causal variant is timed against non-causal SDPA."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=gen) for _ in range(3))
    for spec, causal in (("decay=none,causal,dk=16,dv=16", True), ("decay=none,noncausal,dk=16,dv=16", False)):
        sdpa, head_first = bench.contenders(lightgen.compile(spec), None, None)["sdpa"]
        assert head_first
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(sdpa(q, k, v), want)

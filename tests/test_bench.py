"""lightgen.bench's table rows on the CPU (the timings themselves need a GPU)."""
from lightgen import bench


def test_a_row_gives_eager_and_graph_times_and_the_speedups(capsys):
    row = {"N": 4096, "B": 16, "floor_fwd_ms": 0.5, "floor_fwdbwd_ms": 1.0,
           "lightgen": {"fwd_ms": 1.0, "fwdbwd_ms": 2.0, "graph": {"fwd_ms": 0.8, "fwdbwd_ms": 1.5}},
           "fla": {"fwd_ms": 2.0, "fwdbwd_ms": 5.0, "graph": {"fwd_ms": 1.6, "fwdbwd_ms": 4.5}},
           "lightning_attn": {"fwd_ms": 3.0, "fwdbwd_ms": 6.0, "graph_error": "RuntimeError: capture failed"}}
    bench._print_row(row)
    line = capsys.readouterr().out
    lightgen, fla, lightning = line.split(" | ")[1:]
    assert "1.000/2.000 (2.00x/2.00x floor; graph 0.800/1.500)" in lightgen
    assert "ours 2.00x/2.50x faster; graph 1.600/4.500, ours 2.00x/3.00x faster" in fla
    assert "ours 3.00x/3.00x faster; no CUDA graph: RuntimeError: capture failed" in lightning

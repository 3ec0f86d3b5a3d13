"""tools/bench_tnl.py, tools/bench_sp.py, tools/bench_dist.py and tools/llama_baseline.py on the CPU: tiny config, contexts
of a few dozen tokens, the attention's PyTorch reference (LIGHTGEN_CPU_REFERENCE=1), so each tool
runs in seconds. They check the tools' wiring and reports; the speeds are measured on a GPU."""
import json

import pytest
import torch
import torch.distributed as dist
from helpers import train_step_keeping

from tnl import TNLConfig
from tnl.distributed.sequence_parallel import METHODS
from tools import bench_dist, bench_sp, bench_sweep, bench_tnl
from tools.llama_baseline import LlamaConfig, LlamaForCausalLM

TINY = ["--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"]


@pytest.fixture(autouse=True)
def cpu_reference(monkeypatch):
    monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the cores are shared
    yield
    torch.set_num_threads(threads)


def test_llama_baseline_matches_the_tnl_size():
    for preset in ("385m", "1b", "7b"):
        config = TNLConfig.preset(preset, vocab_size=64000)
        counts = bench_tnl.parameter_counts(config)
        assert counts["llama"] == pytest.approx(counts["tnl"], rel=0.01), preset
    llama = LlamaConfig.matching(TNLConfig.preset("385m"))
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.vocab_size) == (1024, 24, 8, 256)


def test_llama_baseline_is_causal():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.matching(TNLConfig.preset("tiny", init_std=0.1)))
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])


def test_llama_baseline_checkpointing_keeps_less_and_gives_the_same_gradients():
    grads, kept = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig.matching(TNLConfig.preset("tiny", init_std=0.1)))
        model.gradient_checkpointing = checkpointing
        _, step_grads, step_kept = train_step_keeping(
            model, torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1)))
        grads.append(step_grads)
        kept.append(step_kept)
    assert kept[1] < kept[0] / 2
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


def test_bench_tnl_rows(tmp_path):
    out = tmp_path / "tnl.json"
    returned = bench_tnl.main([*TINY, "--contexts", "16,32,64", "--tokens-per-batch", "64",
                               "--gen-contexts", "8,40", "--gen-tokens", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert [(row["context"], row["batch"]) for row in result["training"]] == [(16, 4), (32, 2), (64, 1)]
    for row in result["training"]:
        for name in ("tnl", "llama"):
            assert row[name]["tokens_per_s"] > 0 and row[name]["peak_gb"] is None  # not tracked on the CPU
        assert row["tnl_over_llama"] == pytest.approx(row["tnl"]["tokens_per_s"] / row["llama"]["tokens_per_s"])
        assert row["tnl"]["vs_first_context"] == pytest.approx(
            row["tnl"]["tokens_per_s"] / result["training"][0]["tnl"]["tokens_per_s"])
    assert [row["context"] for row in result["generation"]] == [8, 40]
    assert all(row["ms_per_token"] > 0 for row in result["generation"])
    assert result["autocast"] is None and result["parameters"]["tnl"] > 0
    assert len(result["targets"]) == 3


def test_bench_tnl_records_a_failing_row_and_goes_on(monkeypatch, capsys):
    real = bench_tnl.train_row

    def llama_runs_out_of_memory(name, *args):
        if name == "llama":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(name, *args)

    monkeypatch.setattr(bench_tnl, "train_row", llama_runs_out_of_memory)
    result = bench_tnl.main([*TINY, "--contexts", "16,32", "--tokens-per-batch", "32", "--checkpoint",
                             "--gen-contexts", ""])
    for row in result["training"]:
        assert row["llama"] == {"error": "OOM"} and "tnl_over_llama" not in row
        assert row["tnl"]["tokens_per_s"] > 0
    assert result["generation"] == [] and result["checkpoint"]
    assert "OOM" in capsys.readouterr().out


def test_bench_sp_agrees_with_the_plain_model(tmp_path):
    out = tmp_path / "sp.json"
    bench_sp.main([*TINY, "--contexts", "16,32", "--tokens-per-batch", "64", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [(row["context"], row["batch"]) for row in result["rows"]] == [(16, 4), (32, 2)]
    for row in result["rows"]:
        assert row["plain"]["tokens_per_s"] > 0
        for method in METHODS:
            assert row[method]["loss"] == pytest.approx(row["plain"]["loss"], rel=1e-6)
            assert row[method]["max_grad_rel_diff"] <= 1e-5 and row[method]["agree"]
            assert row[method]["vs_plain"] > 0
    assert not dist.is_initialized()  # the one-rank group is gone


def test_bench_dist_stops_at_the_first_context_that_does_not_fit(monkeypatch, tmp_path):
    """One rank (no torchrun): the sweep ends at the first OOM and the JSON keeps the rows before it."""
    real = bench_dist.train_row

    def long_rows_run_out_of_memory(model, optimizer, mesh, context, *args):
        if context > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, optimizer, mesh, context, *args)

    monkeypatch.setattr(bench_dist, "train_row", long_rows_run_out_of_memory)
    out = tmp_path / "dist.json"
    result = bench_dist.main([*TINY, "--contexts", "16,32,64", "--checkpoint", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    first, second = result["rows"]  # 64 never ran
    assert first["context"] == 16 and first["tokens_per_s_per_gpu"] > 0 and 5.0 < first["loss"] < 6.0
    assert second == {"context": 32, "batch": 1, "error": "OOM"}
    assert result["mesh"] == {"dp": 1, "sp": 1, "tp": 1} and result["checkpoint"]
    assert not dist.is_initialized()


@pytest.mark.parametrize("tool, argv, option", [
    (bench_tnl, ["--config", "13b"], "--config"),
    (bench_tnl, ["--contexts", "2048,3000"], "--contexts"),
    (bench_tnl, ["--contexts", "2k"], "--contexts"),
    (bench_tnl, ["--models", "tnl,gpt"], "--models"),
    (bench_tnl, ["--gen-tokens", "0"], "--gen-tokens"),
    (bench_tnl, ["--dtype", "fp8", "--contexts", "", "--gen-contexts", ""], "--dtype"),
    (bench_sp, ["--methods", "ring"], "--methods"),
    (bench_sp, ["--contexts", "0"], "--contexts"),
    (bench_dist, ["--device", "cpu", "--sp", "2"], "--sp"),
    (bench_dist, ["--device", "cpu", "--batch", "0"], "--batch"),
])
def test_bad_arguments_name_the_option(tool, argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert option in str(exc.value) + capsys.readouterr().err


# lightgen/bench.py: the pieces that run without a GPU


def test_bench_json_is_written_atomically(tmp_path):
    from lightgen.bench import write_json

    path = tmp_path / "out" / "bench.json"
    write_json({"rows": [1]}, path)
    write_json({"rows": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temp file left


def _fake_fla(monkeypatch, flag):
    """Insert fla, fla.ops, fla.ops.common and fla.ops.common.chunk_o (TRITON_ABOVE_3_7_1 = flag)."""
    import sys
    import types

    names = ["fla", "fla.ops", "fla.ops.common", "fla.ops.common.chunk_o"]
    modules = [types.ModuleType(name) for name in names]
    for parent, child in zip(modules, modules[1:]):
        setattr(parent, child.__name__.rpartition(".")[2], child)
    modules[-1].TRITON_ABOVE_3_7_1 = flag
    for name, module in zip(names, modules):
        monkeypatch.setitem(sys.modules, name, module)
    return modules[-1]


def test_lift_fla_hopper_guard(monkeypatch, capsys):
    import sys

    from lightgen.bench import lift_fla_hopper_guard

    chunk_o = _fake_fla(monkeypatch, False)
    assert lift_fla_hopper_guard() is True and chunk_o.TRITON_ABOVE_3_7_1 is True
    assert "lifted fla-core's Hopper guard" in capsys.readouterr().out
    assert lift_fla_hopper_guard() is False and chunk_o.TRITON_ABOVE_3_7_1 is True  # nothing left to lift
    assert capsys.readouterr().out == ""
    monkeypatch.setitem(sys.modules, "fla", None)  # fla-core not installed: import fails
    assert lift_fla_hopper_guard() is False


def test_fla_decode_peer_per_decay(monkeypatch):
    """The decode bench's fla kernel: fused_recurrent_gla with gk for decay=vector (one token's g [B, 1, H, dk]),
    else fused_recurrent_simple_gla with g / g_gamma as given."""
    import sys
    import types

    from lightgen import Variant
    from lightgen.bench import _fla_recurrent, _fla_step

    calls = []
    gla, simple = types.ModuleType("fla.ops.gla"), types.ModuleType("fla.ops.simple_gla")
    gla.fused_recurrent_gla = lambda q, k, v, **kw: calls.append(("gla", kw)) or (v, None)
    simple.fused_recurrent_simple_gla = lambda q, k, v, **kw: calls.append(("simple", kw)) or (v, None)
    monkeypatch.setitem(sys.modules, "fla.ops.gla", gla)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", simple)
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 8)
    g = -torch.rand(2, 3, 4)
    out = _fla_step(_fla_recurrent(Variant.parse("decay=vector,causal,dk=16,dv=16")), q, k, v, {"g": g}, 0.5, 4)()
    kind, kw = calls.pop()
    assert kind == "gla" and kw["gk"].shape == (2, 1, 3, 4) and "g" not in kw and torch.equal(out, v)
    assert kw["initial_state"].shape == (2, 3, 4, 8) and kw["scale"] == 0.5
    _fla_step(_fla_recurrent(Variant.parse("decay=constant,causal,dk=16,dv=16")), q, k, v,
              {"g_gamma": torch.ones(3)}, 0.5, 4)()
    kind, kw = calls.pop()
    assert kind == "simple" and kw["g_gamma"].shape == (3,)


def test_fla_agreement_check_can_fail():
    from lightgen.bench import AGREE, _worst, agreement

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(2, 5, 3, 4, generator=gen)
    g = (-torch.rand(2, 5, 3, generator=gen)).requires_grad_()

    def ours(q, k, v):  # causal decayed attention, small enough to write out
        scores = torch.einsum("bthd,bshd->bhts", q, k)
        cum = g.cumsum(1).transpose(1, 2)  # [B, H, N]
        decay = (cum[..., :, None] - cum[..., None, :]).tril().exp().tril()
        return torch.einsum("bhts,bshd->bthd", scores * decay, v)

    def same(q, k, v):
        return ours(q.clone(), k, v)

    def perturbed(q, k, v):
        return ours(q, k * 1.2, v)

    agree = agreement(ours, same, (q, k, v), do, g)
    assert set(agree) == {"o", "dq", "dk", "dv", "dg"} and _worst(agree) < 1e-6
    differ = agreement(ours, perturbed, (q, k, v), do, g)
    assert differ["o"] > AGREE and differ["dq"] > AGREE and not _worst(differ) <= AGREE
    assert all(t.grad is None for t in (q, k, v, g))  # the check leaves the timed leaves' .grad alone
    assert set(agreement(lambda q, k, v: q * k * v, lambda q, k, v: q * k * v, (q, k, v), do)) == \
        {"o", "dq", "dk", "dv"}


def test_bench_row_marks_wrong_fla_results(capsys):
    from lightgen.bench import _print_row

    row = {"N": 1024, "B": 64, "floor_fwd_ms": 1.0, "floor_fwdbwd_ms": 2.0,
           "lightgen": {"fwd_ms": 2.0, "fwdbwd_ms": 4.0},
           "fla": {"fwd_ms": 3.0, "fwdbwd_ms": 6.0, "vs_lightgen": {"o": 1e-3, "dq": 0.4}, "wrong": True}}
    _print_row(row)
    marker = "fla results differ from lightgen's (max rel err 0.4): its time is of wrong results"
    assert marker in capsys.readouterr().out
    row["fla"].update(vs_lightgen={"o": 1e-3, "dq": 2e-3}, wrong=False)
    _print_row(row)
    out = capsys.readouterr().out
    assert "agrees with lightgen (max rel err 2.0e-03)" in out and "wrong results" not in out


@pytest.fixture
def saved_sweep(tmp_path):
    """Session 14's H100 bench runs (docs/measurements) laid out as a sweep's folder."""
    from pathlib import Path
    measurements = Path(__file__).resolve().parents[1] / "docs" / "measurements"
    for name in bench_sweep.VARIANTS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text((measurements / f"bench_h100_{name}_s14.json").read_text())
    return tmp_path


def test_bench_sweep_reports_the_table_and_every_target(saved_sweep, capsys):
    text = bench_sweep.main(["--report", str(saved_sweep)])
    assert text == capsys.readouterr().out.rstrip("\n")
    assert "| 16K | **0.476 / 1.685** | 0.474 / 1.678 | 1.31x / 1.69x; 1.31x / 1.69x | 2.23 / 2.71 (2.23 / 2.72) |" in text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 4 * 7 + 1  # seven targets for each plain variant, and the full TNL's
    # judged on each cell's lesser time: D = 128's 8K fwd+bwd replay (1.819 ms, a clock dip) does not count
    assert "- tnl_d128: forward within 1.3x of the floor (x floor): NOT met: 1.31 at 16K, 1.43 at 32K, 1.49 at 64K" \
        in lines[0]
    assert lines[1].startswith("- tnl_d128: forward+backward within 1.6x of the floor (x floor): NOT met: 1.69 at 16K,")
    assert "- tnl_d128: forward time per token flat over N, max / min at most 1.1: NOT met: 1.46 (64K over 8K)" in lines
    assert "- tnl_d128: fla's chunk_simple_gla / lightgen, fwd+bwd, at least 2.0x: met (2.72-3.70)" in lines
    assert "- tnl_d64: forward+backward within 1.6x of the floor (x floor): NOT met: 1.66 at 64K (all: 1.33-1.66)" in lines
    assert "- none_d64: forward+backward within 1.6x of the floor (x floor): NOT met: 1.62 at 64K (all: 1.29-1.62)" in lines
    assert lines[-1].startswith("- full_tnl_d128: the full TNL's time over the plain TNL's, at most 1.1x: NOT met: "
                                "3.50 at 1K fwd, 4.65 at 1K fwdbwd")


def test_bench_sweep_figures_never_read_as_their_limit():
    """A figure that rounds to the limit it fails (or passes) shows a third decimal."""
    assert bench_sweep._shown(1.1021, 1.10) == "1.102" and bench_sweep._shown(1.0981, 1.10) == "1.098"
    assert bench_sweep._shown(1.10, 1.10) == "1.10" and bench_sweep._shown(1.1349, 1.10) == "1.13"
    line = bench_sweep._verdict("flat", [("64K", 1.1021), ("8K", 1.0)], lambda x: x <= 1.10, 1.10)
    assert line == "- flat: NOT met: 1.102 at 64K (all: 1.00-1.102)"


def test_bench_sweep_runs_only_what_is_missing(saved_sweep, monkeypatch):
    import shutil
    shutil.rmtree(saved_sweep / "none_d64")
    cut = saved_sweep / "full_tnl_d128" / "bench.json"  # a run that stopped after two lengths
    saved = json.loads(cut.read_text())
    cut.write_text(json.dumps({**saved, "rows": saved["rows"][:2]}))
    (saved_sweep / "none_d128" / "bench.json").write_text('{"rows": [{"N": 1024')  # cut short: run again
    commands = []

    def bench(command, check):
        commands.append(command)
        if command[4] == bench_sweep.VARIANTS["none_d128"]:  # a failing run ends neither the sweep nor the report
            raise bench_sweep.subprocess.CalledProcessError(1, command)
    monkeypatch.setattr(bench_sweep.subprocess, "run", bench)
    text = bench_sweep.main(["--out", str(saved_sweep)])
    assert "none_d128" not in text and "- tnl_d64: " in text
    # the other two have every length: they do not run again
    assert [command[4] for command in commands] == [bench_sweep.VARIANTS[name]
                                                   for name in ("none_d128", "none_d64", "full_tnl_d128")]
    assert commands[2][-2:] == ["--only", "lightgen"] and commands[1][-2] == "--seqlens"


def test_bench_sweep_names_a_wrong_variant(tmp_path):
    with pytest.raises(SystemExit, match="--only: tnl_d96: expected names from tnl_d128"):
        bench_sweep.main(["--report", str(tmp_path), "--only", "tnl_d96"])
    with pytest.raises(SystemExit, match="no <variant>/bench.json there"):
        bench_sweep.main(["--report", str(tmp_path)])


def test_bench_varlen_packings_and_spec_check():
    """tools/bench_varlen's packings hold exactly the tokens asked for, one of them a single sequence and one with
    nothing to cut; a variant whose math fla's chunk_simple_gla / chunk_gla do not compute (but a non-causal one,
    which runs without fla) is refused by name."""
    from tools import bench_varlen

    packs = bench_varlen.packings(65536)
    assert all(sum(lengths) == 65536 and min(lengths) > 0 for lengths in packs.values())
    assert packs["one"] == [65536] and set(packs["equal 8K"]) == {8192}
    assert max(packs["mix"]) < 65536 // 2 < sum(packs["mix"])  # long-tailed: no single one dominates
    for refused in ("decay=scalar,causal,lrpe=d,dk=64,dv=64", "decay=constant,noncausal,gate=silu,dk=64,dv=64",
                    "decay=none,causal,phi=silu,dk=64,dv=64"):
        with pytest.raises(SystemExit, match=f"--spec {refused}"):
            bench_varlen.main(["--spec", refused])
    assert bench_varlen.parse_args(["--packings", "mix,one"]).packings == ["mix", "one"]
    assert bench_varlen.parse_args(["--no-fla"]).no_fla and not bench_varlen.parse_args([]).no_fla
    with pytest.raises(SystemExit):
        bench_varlen.parse_args(["--packings", "mix,twelve"])

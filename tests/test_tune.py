"""Launch-config lookup (lightgen.launch) and the tuner (lightgen.tune), on the CPU.

The tuner tests are dry runs under Triton's interpreter with tiny shapes: they check the pipeline
(child-process trials, failure handling, journal resume, recording), not speed.
"""
import itertools
import math
import shutil
import warnings

import pytest
import torch

from lightgen import configs, launch, render
from lightgen.cli import main as cli_main
from lightgen.launch import LaunchConfigWarning
from lightgen.spec import Variant

GPU = "NVIDIA H100 80GB HBM3"
VARIANT = Variant.parse("decay=constant,causal,dk=64,dv=32")
CUDA0 = torch.device("cuda", 0)  # constructible without a GPU: launch.params only looks at it
TUNED = {"C": 128, "BK": 32, "BV": 16, "num_warps": 8, "num_stages": 3}
SPEC = "decay=constant,causal,dk=16,dv=16,scale=1"  # the smallest kernels: fast in the interpreter


@pytest.fixture
def store(store, monkeypatch):
    """conftest's private stores, an H100 as the 'current' GPU, and launch's caches emptied."""
    user, shipped = store
    monkeypatch.setattr(configs, "current_arch", lambda device=None: ("sm90", GPU))
    monkeypatch.setattr(launch, "_keys", {})
    monkeypatch.setattr(launch, "_warned", set())
    return user


def record(params, n=4096, kernel="fwd", dtype="bf16", variant=VARIANT):
    key = configs.ConfigKey("sm90", GPU, configs.triton_version(), render.kernel_key(variant, kernel), kernel, variant.dk,
                            variant.dv, dtype, n)
    configs.record(key, params, 1.0, 10)


def params(n, kernel="fwd", dtype=torch.bfloat16, device=CUDA0):
    return launch.params(VARIANT, kernel, dtype, n, device)


def count_warnings(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in seen if issubclass(w.category, LaunchConfigWarning)]


# ---- launch.params ------------------------------------------------------------------------------

def test_tuned_hit_and_nearest_bucket(store):
    record(TUNED, n=4096)
    record({**TUNED, "C": 32}, n=65536)
    (hit, near_small, near_big), seen = count_warnings(lambda: (params(4096), params(1000), params(40000)))
    assert hit == near_small == TUNED  # 1000 -> bucket 1024, nearest tuned bucket 4096
    assert near_big["C"] == 32  # 40000 -> bucket 65536
    assert not seen
    with pytest.warns(LaunchConfigWarning):  # another key
        assert params(4096, dtype=torch.float16) == launch.heuristic(VARIANT, "fwd", interpreted=False)


def test_entries_do_not_depend_on_the_scale(store):
    # the scale is a run-time argument: one tuned entry serves every scale (the default dk**-0.5 included),
    # while a change to what the kernels compute makes new ones
    record({"C": 64, "BK": 32, "BV": 32, "num_warps": 4, "num_stages": 3})
    for scale in ("", ",scale=1", ",scale=0.37"):
        other = Variant.parse(f"decay=constant,causal,dk=64,dv=32{scale}")
        assert render.kernel_key(other, "fwd") == render.kernel_key(VARIANT, "fwd")
        assert launch.params(other, "fwd", torch.bfloat16, 4096, CUDA0)["C"] == 64
    assert render.kernel_key(Variant.parse("decay=none,causal,dk=64,dv=32"), "fwd") != render.kernel_key(VARIANT, "fwd")


def test_a_template_edit_resets_only_the_entries_of_the_kernels_it_touches(tmp_path):
    """Entries are keyed by each kernel's generated code (render.kernel_key), not by the whole module's."""
    shutil.copytree(render.template_dir(), tmp_path / "t")
    main = tmp_path / "t" / "kernels.py.j2"
    keys = lambda: {k: render.kernel_key(VARIANT, k, tmp_path / "t") for k in launch.kernels(VARIANT)}  # noqa: E731
    before, module = keys(), render.source_key(VARIANT, tmp_path / "t")
    assert len(set(before.values())) == len(before)  # one key per kernel
    main.write_text(main.read_text().replace("-- do not edit;", "-- do not edit by hand;"))  # the docstring
    assert keys() == before and render.source_key(VARIANT, tmp_path / "t") != module
    main.write_text(main.read_text().replace("# One reverse sweep for dk and dv", "# One backward sweep for dk and dv"))
    after = keys()
    assert after["bwd_dkv"] != before["bwd_dkv"]
    assert {k: v for k, v in after.items() if k != "bwd_dkv"} == {k: v for k, v in before.items() if k != "bwd_dkv"}
    with pytest.raises(ValueError, match="kernel='bwd'"):
        render.kernel_key(VARIANT, "bwd")


def test_module_keyed_entries_move_to_their_kernels_keys(tmp_path, capsys):
    """tools/rekey_tuned.py: entries keyed by a variant's whole module (before per-kernel keys) move to the
    keys of its kernels; entries of other variants stay."""
    from tools import rekey_tuned

    module, other = render.source_key(VARIANT), "0123456789abcdef0123"
    for variant, kernel in ((module, "fwd"), (module, "bwd_dkv"), (other, "fwd")):
        configs.record(configs.ConfigKey("sm90", GPU, "3.6", variant, kernel, 64, 32, "bf16", 4096), TUNED, 1.0, 3,
                       directory=tmp_path)
    assert rekey_tuned.main([str(tmp_path / "sm90.json"), "decay=constant,causal,dk=64,dv=32"]) == 0
    assert "moved 2 entries" in capsys.readouterr().out
    got = {(k.variant, k.kernel) for k, _ in configs.entries(tmp_path)}
    assert got == {(render.kernel_key(VARIANT, "fwd"), "fwd"), (render.kernel_key(VARIANT, "bwd_dkv"), "bwd_dkv"),
                   (other, "fwd")}


def test_state_passes_borrow_their_kernels_entries_with_at_most_4_warps(store):
    """Sequence splitting's state passes launch as fwd / bwd_dv do, with at most 4 warps while a program's state
    has at most 128 x 128 entries; the full TNL's [2 dk, dv] at D = 128 keeps the kernel's 8. An override is taken
    as given."""
    record(TUNED, kernel="fwd")
    record({**TUNED, "C": 32}, kernel="bwd_dv")
    assert params(4096, "fwd_state") == {**TUNED, "num_warps": 4}
    assert params(4096, "bwd_state") == {**TUNED, "C": 32, "num_warps": 4}
    full = Variant.parse("decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128")
    whole_row = {"C": 16, "BK": 64, "BV": 128, "num_warps": 8, "num_stages": 2}
    record(whole_row, kernel="fwd", variant=full)
    assert launch.params(full, "fwd_state", torch.bfloat16, 4096, CUDA0) == whole_row
    with launch.override(TUNED):
        assert params(4096, "fwd_state") == TUNED


def test_miss_warns_once_and_uses_the_heuristic(store):
    first, seen = count_warnings(lambda: [params(n) for n in (1024, 2048, 1024)])
    assert all(p == launch.heuristic(VARIANT, "fwd", interpreted=False) for p in first)
    assert len(seen) == 1
    assert "heuristic default" in str(seen[0].message) and "lightgen tune" in str(seen[0].message)
    # another kernel or dtype is another key: one more warning each; the same key stays quiet
    _, seen = count_warnings(lambda: [params(1024, "bwd_dq"), params(1024, dtype=torch.float16), params(4096)])
    assert len(seen) == 2


@pytest.mark.parametrize("entry, why", [
    ({k: v for k, v in TUNED.items() if k != "num_stages"}, "missing num_stages"),
    ({**TUNED, "C": 96}, "C=96"),
    ({**TUNED, "C": 8}, "C=8"),
    ({**TUNED, "BK": 128}, "BK=128"),  # does not divide dk=64
    ({**TUNED, "BV": 64}, "BV=64"),  # larger than dv=32
    ({**TUNED, "num_warps": 3}, "num_warps=3"),
    ({**TUNED, "num_stages": 0}, "num_stages=0"),
    ({**TUNED, "BV": True}, "BV=True"),
])
def test_invalid_entry_warns_and_falls_back(store, entry, why):
    record(entry)
    result, seen = count_warnings(lambda: [params(4096), params(4096)])
    assert result == [launch.heuristic(VARIANT, "fwd", interpreted=False)] * 2
    assert len(seen) == 1 and "invalid" in str(seen[0].message) and why in str(seen[0].message)


def test_interpreter_never_looks_up(store, monkeypatch):
    monkeypatch.setattr(configs, "lookup", lambda *a: pytest.fail("looked up on the CPU"))
    result, seen = count_warnings(lambda: params(4096, device=torch.device("cpu")))
    assert result == launch.heuristic(VARIANT, "fwd", interpreted=True) and not seen


def test_override_is_scoped_and_merges_over_the_heuristic(store, monkeypatch):
    record(TUNED)
    with launch.override({"C": 64, "num_warps": 2}):
        forced = params(4096)
        with launch.override(TUNED):
            assert params(4096, device=torch.device("cpu")) == TUNED  # the interpreter path too
        assert params(4096) == forced
    assert forced == {**launch.heuristic(VARIANT, "fwd", interpreted=False), "C": 64, "num_warps": 2}
    assert params(4096) == TUNED  # back to the lookup


# ---- the tuner (dry runs under the interpreter) -------------------------------------------------

@pytest.fixture
def optuna():
    return pytest.importorskip("optuna")


def trials_of(optuna, path, kernel="fwd", n=32):
    from lightgen import tune

    storage = tune._journal(optuna, path)
    name = next(s.study_name for s in optuna.get_all_study_summaries(storage)
                if f":{kernel}:" in s.study_name and f":N{n}:" in s.study_name)
    return optuna.load_study(study_name=name, storage=storage).trials


def dry_run(tmp_path, **kw):
    from lightgen import tune

    args = dict(seqlens=(32, 64), dtypes=("fp32",), tokens=64, hidden=32, trials=3, device="cpu",
                out_dir=tmp_path / "tune", directory=tmp_path / "store", progress=False)
    return tune.tune(SPEC, **{**args, **kw})


def test_dry_run_records_and_resumes(tmp_path, optuna, interpreter, monkeypatch):
    from lightgen import tune

    results = dry_run(tmp_path)
    assert len(results) == 10  # 5 kernels x 2 seqlens x 1 dtype
    variant = Variant.parse(SPEC)
    for r in results:
        assert "error" not in r, r
        assert r["trials"] == 3 and r["ms"] <= r["default_ms"]
        assert launch.problem(r["params"], variant) is None
    stored = {(k.kernel, k.n_bucket): v for k, v in configs.entries(tmp_path / "store")}
    assert set(stored) == {(k, n) for k in tune.KERNELS for n in (32, 64)}
    assert all(v["trials"] == 3 for v in stored.values())
    first = trials_of(optuna, tmp_path / "tune" / "studies.journal")
    assert first[0].params == {k: launch.heuristic(variant, "fwd", True)[k] for k in first[0].params}  # trial 0

    # the budget is spent: a second call starts no worker and adds no trial
    monkeypatch.setattr(tune._Worker, "_start", lambda self: pytest.fail("started a worker"))
    again = dry_run(tmp_path)
    assert [(r["params"], r["ms"]) for r in again] == [(r["params"], r["ms"]) for r in results]
    assert len(trials_of(optuna, tmp_path / "tune" / "studies.journal")) == 3
    monkeypatch.undo()

    dry_run(tmp_path, trials=4, kernels=("fwd",), seqlens=(32,))  # a larger budget resumes: one more trial
    assert [t.number for t in trials_of(optuna, tmp_path / "tune" / "studies.journal")] == [0, 1, 2, 3]


def test_split_lengths_are_keyed_by_the_pieces_they_launch(tmp_path, optuna, interpreter, monkeypatch):
    # on the GPU a long sequence with few (batch, head) pairs launches as pieces (launch.segments), and
    # lookups go by a piece's length: the tuner must record under that bucket, not the sequence's
    monkeypatch.setattr(launch, "segments", lambda variant, shape, dtype, device: 4 if shape[1] >= 64 else 1)
    results = dry_run(tmp_path, seqlens=(64,), kernels=("fwd",), trials=1)
    assert [(r["n"], r["walked"], r["key"].n_bucket) for r in results] == [(64, 16, 16)]
    assert {k.n_bucket for k, _ in configs.entries(tmp_path / "store")} == {16}


def test_lengths_that_launch_alike_are_tuned_once(tmp_path, optuna, interpreter, monkeypatch):
    # tokens fixed at 64: 32 x 2 unsplit and 64 x 1 in 2 pieces both launch 2 rows of 32 tokens
    monkeypatch.setattr(launch, "segments", lambda variant, shape, dtype, device: max(1, shape[1] // 32))
    results = dry_run(tmp_path, seqlens=(16, 32, 64), kernels=("fwd", "bwd_dq"), trials=1, tokens=64)
    studied = sorted((r["n"], r["kernel"]) for r in results if "ms" in r)
    assert studied == [(16, "bwd_dq"), (16, "fwd"), (32, "bwd_dq"), (32, "fwd")]
    assert sorted((r["n"], r["same_as"]) for r in results if "same_as" in r) == [(64, 32), (64, 32)]
    assert {k.n_bucket for k, _ in configs.entries(tmp_path / "store")} == {16, 32}


def test_warm_up_compiles_the_whole_space_in_parallel(tmp_path, optuna, interpreter, capsys):
    from lightgen import tune

    results = dry_run(tmp_path, seqlens=(32,), kernels=("fwd", "bwd_dq"), trials=1, jobs=2, progress=True)
    assert all("ms" in r for r in results)
    variant = Variant.parse(SPEC)
    points = 0
    for kernel in ("fwd", "bwd_dq"):
        dists = tune.space(optuna, variant, kernel, launch.heuristic(variant, kernel, True))
        points += math.prod(len(d.choices) for d in dists.values())
    assert f"warm-up: {points} configs launched (0 failed)" in capsys.readouterr().out


def test_bwd_dkv_searches_3_and_4_stages(optuna):
    """bwd_dkv's stages are 3 and 4 (2 never won it), the other kernels' 2 and 3: spaces of one size."""
    from lightgen import tune

    variant = Variant.parse("decay=constant,causal,dk=128,dv=128")
    spaces = {k: tune.space(optuna, variant, k, launch.heuristic(variant, k, False)) for k in ("fwd", "bwd_dkv")}
    assert spaces["bwd_dkv"]["num_stages"].choices == (3, 4) and spaces["fwd"]["num_stages"].choices == (2, 3)
    sizes = {k: math.prod(len(d.choices) for d in dists.values()) for k, dists in spaces.items()}
    assert sizes["fwd"] == sizes["bwd_dkv"] <= 40  # the default trial budget walks it through


@pytest.mark.parametrize("fault, reason", [("exit", "warm-up process died (exit code 70)"), ("raise", "injected fault")])
def test_configs_that_fail_in_the_warm_up_are_not_run_again(tmp_path, optuna, interpreter, monkeypatch, capsys, fault, reason):
    """A config that crashes its warm-up child (or raises there) fails its trial without the trial worker
    running it; the rest of a dead child's share goes to the next round's children."""
    from lightgen import tune

    monkeypatch.setenv("LIGHTGEN_TUNE_FAULT", fault)  # every config but the default misbehaves
    variant = Variant.parse(SPEC)
    default = launch.heuristic(variant, "fwd", interpreted=True)
    points = math.prod(len(d.choices) for d in tune.space(optuna, variant, "fwd", default).values())
    (result,) = dry_run(tmp_path, seqlens=(32,), kernels=("fwd",), trials=3, jobs=2, progress=True)
    assert f"warm-up: {points} configs launched ({points - 1} failed)" in capsys.readouterr().out
    assert result["params"] == default and result["failed"] >= 1
    for t in trials_of(optuna, tmp_path / "tune" / "studies.journal"):
        if {**default, **t.params} != default:
            assert t.user_attrs["error"] == f"in the warm-up: {reason}" if fault == "exit" else \
                t.user_attrs["error"].startswith("in the warm-up: RuntimeError: injected fault")


@pytest.mark.parametrize("fault, reason", [("exit", "worker process died (exit code 70)"),
                                           ("raise", "injected fault"), ("wrong", "wrong result")])
def test_failing_trials_are_recorded_as_failed(tmp_path, optuna, interpreter, monkeypatch, fault, reason):
    monkeypatch.setenv("LIGHTGEN_TUNE_FAULT", fault)  # every trial but the default misbehaves
    (result,) = dry_run(tmp_path, seqlens=(32,), kernels=("fwd",), trials=3)
    default = launch.heuristic(Variant.parse(SPEC), "fwd", interpreted=True)
    assert result["params"] == default and result["ms"] == result["default_ms"]
    trials = trials_of(optuna, tmp_path / "tune" / "studies.journal")
    assert len(trials) == 3
    for t in trials:
        if {**default, **t.params} == default:
            assert t.state == optuna.trial.TrialState.COMPLETE
        else:
            assert t.state == optuna.trial.TrialState.FAIL and reason in t.user_attrs["error"]
    assert result["failed"] == sum(t.state == optuna.trial.TrialState.FAIL for t in trials) >= 1
    assert result["wrong"] == (result["failed"] if fault == "wrong" else 0)


class _RecordingWorker:
    """In-process stand-in for tune._Worker: times every config at `ms(params)`, keeps the requests."""
    timeout_s = 10.0

    def __init__(self, ms):
        self.ms, self.requests = ms, []

    def run(self, request, timeout_s=None):
        self.requests.append(request)
        return {} if request["params"] is None else {"ms": self.ms(request["params"]), "rel_err": 0.0}


def test_a_study_starts_from_the_default_then_its_hints(tmp_path, optuna, store):
    from lightgen import tune

    variant = Variant.parse(SPEC)
    default = launch.heuristic(variant, "fwd", interpreted=True)
    hint = {**default, "C": 16, "num_warps": 8}
    recorded = {**default, "C": 64, "num_stages": 2}
    tuned = tune._Study("fp32", 32, 2, 32, "fwd")
    env = dict(arch="sm90", gpu=GPU, triton=configs.triton_version(), device="cpu", heads=2, tokens=64, trials=4,
               seed=0, interpreted=True, directory=tmp_path / "store", deadline=math.inf)
    key = configs.ConfigKey("sm90", GPU, env["triton"], render.kernel_key(variant, "fwd"), "fwd", 16, 16, "fp32", 32)
    configs.record(key, recorded, 5.0, 4)  # the store's entry for this key is the third guess
    worker = _RecordingWorker(lambda p: 1.0 if p == default else 2.0)
    bar = type("Bar", (), {"write": print, "set_postfix_str": lambda self, s: None})()
    result = tune._tune_study(optuna, tune._journal(optuna, tmp_path / "j.journal"), worker, variant, tuned, env, bar,
                              hints=[hint, default])  # a hint equal to the default is not tried twice
    # (the first request prepares the case; the last ones re-time the finalists, without "beat_ms")
    runs = [r for r in worker.requests[1:] if "beat_ms" in r]
    trials = [r["params"] for r in runs]
    assert trials[:3] == [default, hint, recorded] and result["trials"] == 4  # (a repeat is not run again)
    # screening: the default is measured in full, every later trial against the best so far
    assert [r["beat_ms"] for r in runs] == [None] + [1.0] * (len(trials) - 1)
    assert result["params"] == default and result["ms"] == 1.0 and result["seconds"] >= 0


def test_a_lucky_timing_loses_when_the_finalists_are_timed_again(tmp_path, optuna):
    # a trial's one timing can come out fast by luck: the study's end times its fastest configs and the
    # default once more, and records the fastest of those second timings
    from lightgen import tune

    variant = Variant.parse(SPEC)
    default = launch.heuristic(variant, "fwd", interpreted=True)
    lucky, steady = {**default, "C": 16}, {**default, "num_warps": 8}
    timings = {str(lucky): [0.5, 3.0], str(steady): [0.9, 0.95]}  # first timing, then the second
    worker = _RecordingWorker(lambda p: timings[str(p)].pop(0) if str(p) in timings else 1.0)
    env = dict(arch="sm90", gpu=GPU, triton=configs.triton_version(), device="cpu", heads=2, tokens=64, trials=3,
               seed=0, interpreted=True, directory=tmp_path / "store", deadline=math.inf)
    bar = type("Bar", (), {"write": print, "set_postfix_str": lambda self, s: None})()
    result = tune._tune_study(optuna, tune._journal(optuna, tmp_path / "j.journal"), worker, variant,
                              tune._Study("fp32", 32, 2, 32, "fwd"), env, bar, hints=[lucky, steady])
    retimed = [r["params"] for r in worker.requests if r["params"] is not None and "beat_ms" not in r]
    assert sorted(map(str, retimed)) == sorted(map(str, [lucky, steady, default]))
    assert result["params"] == steady and result["ms"] == 0.95 and result["default_ms"] == 1.0


def test_a_space_the_budget_covers_is_walked_through(tmp_path, optuna):
    # TPE repeats itself in a small space (a repeat counts as a trial) and can miss its best: with as many
    # trials as configs, every config is run once
    from lightgen import tune

    variant = Variant.parse(SPEC)
    default = launch.heuristic(variant, "fwd", interpreted=True)
    dists = tune.space(optuna, variant, "fwd", default)
    every = [dict(zip(dists, values)) for values in itertools.product(*(d.choices for d in dists.values()))]
    best = every[-1] if every[-1] != {k: default[k] for k in dists} else every[-2]
    env = dict(arch="sm90", gpu=GPU, triton=configs.triton_version(), device="cpu", heads=2, tokens=64,
               trials=len(every), seed=0, interpreted=True, directory=tmp_path / "store", deadline=math.inf)
    worker = _RecordingWorker(lambda p: 1.0 if {k: p[k] for k in dists} == best else 2.0)
    bar = type("Bar", (), {"write": print, "set_postfix_str": lambda self, s: None})()
    result = tune._tune_study(optuna, tune._journal(optuna, tmp_path / "j.journal"), worker, variant,
                              tune._Study("fp32", 32, 2, 32, "fwd"), env, bar)
    run = [{k: r["params"][k] for k in dists} for r in worker.requests[1:] if "beat_ms" in r]
    assert sorted(map(str, run)) == sorted(map(str, every))  # each config once
    assert {k: result["params"][k] for k in dists} == best and result["ms"] == 1.0


def test_a_slow_config_is_screened_not_measured_in_full(monkeypatch):
    from conftest import DEVICE

    from lightgen import tune

    variant = Variant.parse(SPEC)
    default = launch.heuristic(variant, "fwd", interpreted=DEVICE == "cpu")
    request = dict(spec=SPEC, kernel="fwd", dtype="fp32", n=32, b=2, h=2, default=default, params=default)
    cases = {}
    modes = []  # quick or not, per measurement
    time_ms = tune._Kernel.time_ms

    def spy(self, params, quick=False):
        modes.append(quick)
        return time_ms(self, params, quick)
    monkeypatch.setattr(tune._Kernel, "time_ms", spy)
    full = tune._serve({**request, "beat_ms": None}, cases, torch.device(DEVICE))
    assert "screened" not in full and modes == [False]  # no best yet: measured in full
    modes.clear()
    slow = tune._serve({**request, "beat_ms": full["ms"] / 100}, cases, torch.device(DEVICE))
    assert slow["screened"] and slow["ms"] > tune.SCREEN * full["ms"] / 100 and modes == [True]
    modes.clear()
    contender = tune._serve({**request, "beat_ms": full["ms"] * 100}, cases, torch.device(DEVICE))
    assert "screened" not in contender and modes == [True, False]  # quick first, then in full


def test_trial_outputs_are_checked_against_the_default():
    from conftest import DEVICE

    from lightgen import tune

    case = tune._Case(SPEC, "fp32", 40, 2, 2, torch.device(DEVICE))
    default = launch.heuristic(case.attn.variant, "bwd_dq", interpreted=DEVICE == "cpu")
    kernel = case.kernel("bwd_dq", default)
    assert [tuple(t.shape) for t in kernel.outputs] == [(2, 40, 2, 16)]  # dq, found by the NaN probe
    assert kernel.error(default) == 0
    if DEVICE == "cpu":  # on an H100, C=64 with 16-wide tiles is one of the configs Triton 3.6 miscompiles
        assert kernel.error({**default, "C": 64}) < 1e-5
    launch_dq = kernel.launch
    kernel.launch = lambda: None  # writes nothing: the NaN fill shows
    assert math.isnan(kernel.error(default))

    def scribble():
        launch_dq()
        kernel.outputs[0][0, 0] += 1
    kernel.launch = scribble
    assert kernel.error(default) > 1e-3


def test_scalar_decay_case_finds_the_decay_gradient_parts():
    """decay=scalar: the tuner's inputs include g, and the dq kernel's outputs its part of dL/dG."""
    from conftest import DEVICE

    from lightgen import tune

    case = tune._Case("decay=scalar,causal,dk=16,dv=16", "fp32", 40, 2, 2, torch.device(DEVICE))
    default = launch.heuristic(case.attn.variant, "bwd_dq", interpreted=DEVICE == "cpu")
    kernel = case.kernel("bwd_dq", default)
    assert sorted(tuple(t.shape) for t in kernel.outputs) == [(2, 40, 2), (2, 40, 2, 16)]  # dG part, dq
    assert kernel.error(default) == 0


def test_hanging_trial_is_killed(tmp_path, optuna, interpreter, monkeypatch):
    monkeypatch.setenv("LIGHTGEN_TUNE_FAULT", "hang")
    (result,) = dry_run(tmp_path, seqlens=(32,), kernels=("fwd",), trials=2, trial_timeout_s=3)
    assert result["failed"] == 1 and "ms" in result
    assert "timed out" in trials_of(optuna, tmp_path / "tune" / "studies.journal")[1].user_attrs["error"]


def test_missing_optuna_names_the_extra(monkeypatch):
    import sys

    from lightgen import tune

    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightgen\[tune\]'"):
        tune.tune(SPEC, device="cpu")
    assert cli_main(["tune", SPEC, "--device", "cpu"]) == 2


def test_tune_rejects_bad_arguments(optuna):
    from lightgen import tune

    for kw, needle in [(dict(dtypes=("bf16",)), "bf16"), (dict(dtypes=("int8",)), "int8"),
                       (dict(kernels=("fwdx",)), "fwdx"), (dict(seqlens=(0,)), "seqlens"), (dict(trials=0), "trials")]:
        with pytest.raises(ValueError, match=needle):
            tune.tune(SPEC, device="cpu", **{"dtypes": ("fp32",), **kw})


# ---- command line -------------------------------------------------------------------------------

def test_cli_help_and_no_cuda(capsys):
    for command in ("tune", "bench"):
        with pytest.raises(SystemExit) as info:
            cli_main([command, "--help"])
        assert info.value.code == 0
    assert "--time-budget" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("the no-CUDA messages need a machine without CUDA")
    for command in ("tune", "bench"):
        assert cli_main([command, SPEC]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert cli_main(["tune", "dk=16", "--device", "cpu"]) == 2  # a bad spec
    assert cli_main(["tune", SPEC, "--device", "cpu", "--commit"]) == 2
    assert cli_main(["tune", SPEC, "--device", "cpu", "--seqlens", "1x"]) == 2


def test_cli_dry_run(tmp_path, optuna, interpreter, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTGEN_TUNED_DIR", str(tmp_path / "user"))
    argv = ["tune", SPEC, "--device", "cpu", "--kernels", "bwd_dkv", "--seqlens", "48", "--trials", "2",
            "--storage", str(tmp_path / "j.journal")]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "bwd_dkv" in out and "1 new or faster entries" in out
    ((key, value),) = configs.entries(tmp_path / "user")
    assert (key.kernel, key.n_bucket, key.dtype, value["trials"]) == ("bwd_dkv", 64, "fp32", 2)


def test_gpus_with_only_mma_sync_take_32_token_chunks_and_the_split_backward_at_d128(store, monkeypatch):
    """Before Hopper (and on sm120) a product's operands and results all live in registers: the H100's 64-token
    chunks spill there at D = 128 (tests/test_inspect.py compiles it), so an untuned A100 takes 32-token chunks in
    every kernel and the split backward (its fused sweep spills at every config). Hopper and Blackwell keep the
    H100's defaults."""
    assert [launch.mma_sync_only(a) for a in ("sm75", "sm80", "sm86", "sm89", "sm90", "sm90a", "sm100", "sm120")] == \
        [True, True, True, True, False, False, False, True]
    tnl = Variant.parse("decay=constant,causal,dk=128,dv=128")
    for kernel in launch.kernels(tnl):
        hopper, ampere = (launch.heuristic(tnl, kernel, interpreted=False, arch=a) for a in ("sm90", "sm80"))
        assert hopper == launch.heuristic(tnl, kernel, interpreted=False)  # sm90: the default arch
        assert ampere == {**hopper, "C": 32}
        assert launch.heuristic(tnl, kernel, interpreted=False, arch="sm100") == hopper
    small = Variant.parse("decay=constant,causal,dk=64,dv=64")  # spills nowhere at the H100's defaults
    assert launch.heuristic(small, "fwd", False, arch="sm80") == launch.heuristic(small, "fwd", False)
    monkeypatch.setattr(configs, "current_arch", lambda device=None: ("sm80", "NVIDIA A100-SXM4-80GB"))
    with pytest.warns(LaunchConfigWarning, match="no tuned launch config"):
        assert launch.params(tnl, "fwd", torch.bfloat16, 4096, CUDA0)["C"] == 32
    assert launch.backward_path(tnl, torch.bfloat16, 4096, CUDA0) == "split"
    assert launch.backward_path(small, torch.bfloat16, 4096, CUDA0) == "fused"

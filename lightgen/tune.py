"""Optuna search over the kernels' launch space, measured on the GPU (`lightgen tune SPEC`).

One study per (kernel, dtype, sequence length): kernel is one of fwd, bwd_dq, bwd_dkv,
bwd_dk, bwd_dv (launch.BACKWARDS: ops takes the faster backward by the recorded times), and the
space is the chunk C, the output tile (BV for fwd, bwd_dkv and bwd_dv, BK for bwd_dq and bwd_dk), num_warps
and num_stages. A trial times ONE kernel launch (median of triton.testing.do_bench) on inputs of
B = tokens // N sequences and H = hidden // D heads. At a study's end its fastest configs and the default
are timed once more (a single timing can come out lucky), and the fastest of those second timings goes
to the tuned-config store (lightgen.configs.record), where launch.params finds it at call time.

Safety: every trial runs in a child process (_Worker), because a bad config can crash the process or
poison its CUDA context (an illegal memory access makes every later CUDA call fail), and each trial's
outputs are compared with those of the heuristic default (Triton 3.6 on H100 silently miscompiles
some configs). A crashed, hung or wrong trial is recorded as FAIL with the reason in its user_attrs
("error") and never chosen. The heuristic default is always trial 0 and always among the finalists
timed again, so a result is never slower than the default as measured.

Resuming: studies live in an Optuna journal file (default ~/.cache/lightgen/tune/studies.journal),
named by their key, so an interrupted tune continues where it stopped; `trials` bounds the finished
trials per study across runs. Run one tuner per journal file at a time.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import configs, launch, render
from .spec import as_variant

KERNELS = ("fwd", "bwd_dq", "bwd_dkv", "bwd_dk", "bwd_dv")
TILE = {"fwd": "BV", "bwd_dq": "BK", "bwd_dkv": "BV", "bwd_dk": "BK", "bwd_dv": "BV"}  # the head dim each kernel's grid tiles
SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
# measured on H100 (Triton 3.6): 128-token chunks run out of shared memory at D = 128 and never won at
# D = 64; 2 warps, 16 warps and 1 stage were never close; 16-token chunks win where the state is large (LRPE)
CHUNKS, TILES, WARPS, STAGES = (16, 32, 64), (32, 64, 128), (4, 8), (2, 3)
# ... but bwd_dkv: every tuned entry of it took 3 stages (38 of 38, session 13), and 4 ran the D = 128 TNL's
# in 0.723 ms against 0.750 at 3 (2 stages: 1.16), so its stages are 3 and 4 (the space keeps its size)
KERNEL_STAGES = {"bwd_dkv": (3, 4)}
# largest relative error (Frobenius) of a trial's outputs against the default config's: configs only
# reorder fp32 sums, a miscompile is off by O(1) or leaves NaN (outputs are NaN-filled before a run)
AGREE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}
# screening: a trial first gets a short measurement; one SCREEN times slower than the study's best so far
# keeps that figure (it cannot win) instead of a full one. Most of a space is that slow: the full
# measurement is kept for the contenders
SCREEN = 1.2
# a study's end times its FINALISTS fastest configs and the default once more, and records the fastest of those
FINALISTS = 3
STARTUP_TIMEOUT_S = 300.0  # a fresh worker importing torch and Triton; compiling the default config
JOBS = 16  # warm-up processes by default: 16 kept an H100 busy compiling (360 configs at D = 128 in 81 s)


def default_storage() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightgen" / "tune" / "studies.journal"


def _import_optuna():
    try:
        import optuna
    except ImportError as err:
        raise ImportError("lightgen tune needs Optuna: pip install 'lightgen[tune]'") from err
    return optuna


def _journal(optuna, path: Path):
    """JournalStorage on a file: JournalFileBackend (Optuna >= 4) or JournalFileStorage (3.x)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from optuna.storages.journal import JournalFileBackend as Backend
    except ImportError:
        from optuna.storages import JournalFileStorage as Backend
    return optuna.storages.JournalStorage(Backend(str(path)))


def space(optuna, variant, kernel: str, default: dict) -> dict:
    """Categorical distributions of the tunable params (the default's values always included)."""
    dim = variant.dk if TILE[kernel] == "BK" else variant.dv
    # the tiles launch.problem accepts: dividing the head dim (and, for a fused norm, the whole row)
    tiles = [t for t in (*TILES, dim) if launch.problem({**default, TILE[kernel]: t}, variant, kernel) is None]
    choices = {"C": CHUNKS, TILE[kernel]: tiles, "num_warps": WARPS, "num_stages": KERNEL_STAGES.get(kernel, STAGES)}
    cat = optuna.distributions.CategoricalDistribution
    return {name: cat(sorted(set(values) | {default[name]})) for name, values in choices.items()}


# ---- the parent: one study per (dtype, N, kernel) ---------------------------------------------

def tune(spec, seqlens=SEQLENS, dtypes=("bf16", "fp16"), tokens=65536, hidden=2048, trials=40,
         time_budget_s=4 * 3600.0, storage=None, out_dir=None, directory=None, kernels=KERNELS,
         device="cuda", seed=0, trial_timeout_s=300.0, progress=True, jobs=None) -> list[dict]:
    """Tune every (kernel, dtype, N) of a variant; record the best configs; return one dict per study.

    jobs > 1: first compile and check every config of every study's space in that many processes at once
    (warm_up; Triton's disk cache keeps the binaries), so that the trial worker, which runs one trial at a
    time, only times, and never runs a config that crashed or miscompiled there. Default (None): up to 16,
    one per CPU, on a GPU (H100, default sweep: 2.7 min at D = 128, 2.2 at D = 64); 1 (no warm-up) on the CPU.

    trials: finished trials per study (across resumed runs); time_budget_s: wall clock of this call
    (the trial in flight finishes; the rest is left for a later call). storage: the journal file,
    else out_dir/studies.journal, else default_storage(). directory: where results are recorded
    (default: the user store; configs.shipped_dir() to commit them). device="cpu": a dry run under
    Triton's interpreter (timings are meaningless; use tiny tokens/hidden).
    """
    optuna = _import_optuna()
    variant = as_variant(spec)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("tune: no CUDA device is available (device='cpu' runs a dry run under Triton's interpreter)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"tune: device must be cuda or cpu, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the worker pins this one
    dtypes = [configs.dtype_name(d) for d in dtypes]
    for d in dtypes:
        if d not in configs.DTYPE_NAMES:
            raise ValueError(f"tune: dtype {d!r}: expected fp32, fp16 or bf16")
        if d == "bf16" and device.type == "cpu":
            raise ValueError("tune: bf16 under Triton's interpreter computes wrong dots; dry-run with fp32 or fp16")
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"tune: kernel {k!r}: expected one of {', '.join(KERNELS)}")
    if not seqlens or any(type(n) is not int or n < 1 for n in seqlens):
        raise ValueError(f"tune: seqlens must be positive ints, got {seqlens!r}")
    if type(trials) is not int or trials < 1:
        raise ValueError(f"tune: trials must be an int >= 1, got {trials!r}")
    if jobs is None:
        jobs = min(JOBS, os.cpu_count() or 1) if device.type == "cuda" else 1
    if type(jobs) is not int or jobs < 1:
        raise ValueError(f"tune: jobs must be an int >= 1, got {jobs!r}")

    arch, gpu = configs.current_arch(device)
    env = dict(arch=arch, gpu=gpu, triton=configs.triton_version(), device=str(device),
               heads=max(1, hidden // max(variant.dk, variant.dv)), tokens=tokens, trials=trials, seed=seed,
               interpreted=device.type != "cuda", directory=directory, deadline=time.monotonic() + time_budget_s)
    path = Path(storage) if storage else Path(out_dir) / "studies.journal" if out_dir else default_storage()
    kernels = [k for k in kernels if k in launch.kernels(variant)]  # decay=vector: no bwd_dkv
    studies, repeats = _distinct_launches(variant, dtypes, seqlens, kernels, tokens, env["heads"], device)

    from tqdm.auto import tqdm

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would drown the bar
    results = []
    failed = warm_up(optuna, variant, studies, env, jobs, trial_timeout_s, progress)["failed"] if jobs > 1 and studies else {}
    found: dict[tuple, dict] = {}  # (kernel, dtype) -> the best params of its latest study: the next length's first guess
    worker = _Worker(str(device), trial_timeout_s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # journal storage on 3.x
            store = _journal(optuna, path)
        with tqdm(total=len(studies), desc="tune", unit="study", disable=not progress) as bar:
            for study in studies:
                if time.monotonic() >= env["deadline"]:
                    bar.write(f"time budget reached: {len(studies) - len(results)} studies left; "
                              f"run again to resume (journal {path})")
                    break
                bar.set_description(f"tune {study.kernel} {study.dtype} N={study.n}")
                known = {params: why for (dtype, kernel, params), why in failed.items()
                         if (dtype, kernel) == (study.dtype, study.kernel)}
                result = _tune_study(optuna, store, worker, variant, study, env, bar,
                                     hints=[found[p] for p in [(study.kernel, study.dtype)] if p in found], known=known)
                if "params" in result:
                    found[study.kernel, study.dtype] = result["params"]
                results.append(result)
                bar.update()
    finally:
        worker.stop()
        optuna.logging.set_verbosity(verbosity)
    return results + repeats


class _Study(NamedTuple):
    """One study: a kernel's launches for inputs [b, n, heads, d] in dtype, whose programs walk `walked` tokens."""
    dtype: str
    n: int
    b: int
    walked: int
    kernel: str

    def request(self, variant, env, default, params=None) -> dict:
        """What the worker (or a warm-up child) needs to build this study's case and run one config."""
        return dict(spec=variant.canonical(), kernel=self.kernel, dtype=self.dtype, n=self.n, b=self.b,
                    h=env["heads"], default=default, params=params)


def _distinct_launches(variant, dtypes, seqlens, kernels, tokens, heads, device) -> tuple[list, list]:
    """(studies, repeats): a _Study per kernel of each distinct launch, and a result for
    each N whose launches repeat an earlier N's. With tokens fixed, a split sequence launches as B * P
    sequences of its pieces: at D = 128 on an H100, 16K, 32K and 64K all launch as 4K does, and the 4K
    entries serve them (lookups go by the walked length), so they are tuned once."""
    studies, repeats, first = [], [], {}
    for dtype in dtypes:
        for n in seqlens:
            b = max(1, tokens // n)
            walked = launch.walked_length(variant, (b, n, heads, variant.dk), configs.torch_dtype(dtype), device)
            shape = (dtype, walked, b * (n // walked))  # what the kernels see: rows of walked tokens
            if shape in first:
                repeats += [{"kernel": k, "dtype": dtype, "n": n, "walked": walked, "same_as": first[shape],
                             "recorded": False} for k in kernels]
                continue
            first[shape] = n
            studies += [_Study(dtype, n, b, walked, k) for k in kernels]  # inputs are shared per (dtype, n)
    return studies, repeats


def _study_name(key: configs.ConfigKey, n: int, b: int, h: int) -> str:
    return (f"{key.variant}:{key.kernel}:{key.dtype}:N{n}:B{b}:H{h}:dk{key.dk}:dv{key.dv}:"
            f"{key.arch}:{key.gpu}:triton{key.triton}")


def _tune_study(optuna, store, worker, variant, plan: _Study, env, bar, hints=(), known=None) -> dict:
    """hints: params to try right after the default (the best of this kernel at the previous length:
    neighbouring lengths mostly share their best config, and a good best early makes screening cut
    more), besides the entry recorded for this key, if any. known: {frozen params: why} of configs the
    warm-up saw fail: their trials fail without running."""
    known = known or {}
    from optuna.trial import TrialState

    start = time.monotonic()
    kernel, dtype, n, walked = plan.kernel, plan.dtype, plan.n, plan.walked
    # keyed by the length the kernels walk, as lookups are: a split sequence launches as pieces
    key = configs.ConfigKey(env["arch"], env["gpu"], env["triton"], render.kernel_key(variant, kernel), kernel,
                            variant.dk, variant.dv, dtype, configs.n_bucket(walked))
    default = launch.heuristic(variant, kernel, interpreted=env["interpreted"], arch=env["arch"])
    dists = space(optuna, variant, kernel, default)
    mine = {name: default[name] for name in dists}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE on 3.x
        sampler = optuna.samplers.TPESampler(seed=env["seed"], multivariate=True)
    study = optuna.create_study(study_name=_study_name(key, n, plan.b, env["heads"]), storage=store, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # left running by an interrupted tune (see module doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", configs.ConfigStoreWarning)  # a hint from a sibling GPU needs no warning
        recorded = configs.lookup_entry(key.arch, key.gpu, key.triton, key.variant, kernel, key.dk, key.dv, dtype, walked)
    # the heuristic default first (the baseline to beat, trial 0), then the hints; each once per study. A
    # space the trial budget covers is then walked through: TPE repeats itself in small spaces (a repeat
    # counts as a trial) and so missed the best of 36 configs at D = 128, 1K in session 11 (0.459 ms for 0.380)
    every = []
    if math.prod(len(d.choices) for d in dists.values()) <= env["trials"]:
        every = [dict(zip(dists, values)) for values in itertools.product(*(d.choices for d in dists.values()))]
    tried = [t.params for t in study.get_trials(deepcopy=False)]  # a resumed study's
    for guess in [default, *hints, *([recorded["params"]] if recorded else []), *every]:
        guess = {name: guess[name] for name in dists}
        if all(v in dists[name].choices for name, v in guess.items()) and guess not in tried:
            study.enqueue_trial(guess)
            tried.append(guess)
    result = {"key": key, "kernel": kernel, "dtype": dtype, "n": n, "walked": walked, "default": default, "recorded": False}

    request = plan.request(variant, env, default)
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=finished)) < env["trials"]:
        # inputs, captured launches and the default's outputs (compiles: more time than a trial)
        reply = worker.run(request, max(worker.timeout_s, STARTUP_TIMEOUT_S))
        if "error" in reply:
            result["error"] = f"the default config {default} failed: {reply['error']}"
            bar.write(f"{kernel} {dtype} N={n}: {result['error']}; skipped")
            return result
    # the same params measured before (the sampler repeats itself in small spaces): reuse the outcome
    seen = {_frozen(t.params): t for t in study.get_trials(deepcopy=False, states=finished)}
    ran = False
    while (len(study.get_trials(deepcopy=False, states=finished)) < env["trials"]
           and time.monotonic() < env["deadline"]):
        trial = study.ask(dists)
        params = {**default, **trial.params}
        before = seen.get(_frozen(trial.params))
        if before is not None:
            for name, value in before.user_attrs.items():
                trial.set_user_attr(name, value)
            study.tell(trial, before.value if before.state == TrialState.COMPLETE else None,
                       state=before.state if before.state != TrialState.COMPLETE else None)
            continue
        if _frozen(params) in known and params != default:
            reply = {"error": f"in the warm-up: {known[_frozen(params)]}"}
        else:
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            beat = min((t.value for t in done), default=None)  # None: the default's trial, always measured in full
            reply = worker.run({**request, "params": params, "beat_ms": beat})
        if "ms" in reply:
            trial.set_user_attr("rel_err", reply["rel_err"])
            if reply.get("screened"):
                trial.set_user_attr("screened", True)
            study.tell(trial, reply["ms"])
        else:
            trial.set_user_attr("error", reply["error"])
            study.tell(trial, state=TrialState.FAIL)
        seen[_frozen(trial.params)] = study.get_trials(deepcopy=False)[trial.number]
        _postfix(bar, study, mine)
        ran = True
    if ran:  # kept in the journal: a resumed study whose budget is spent reports the same best
        study.set_user_attr("retimed", _retime_finalists(worker, request, study, default, mine))
    result["seconds"] = time.monotonic() - start
    return _summarise(study, key, default, mine, env, result)


def _retime_finalists(worker, request, study, default, mine) -> list:
    """[[params, ms]] of the study's FINALISTS fastest configs and the default, each timed once more in full,
    one after another. A trial's one timing can come out lucky: session 20's full TNL `bwd_dq` study recorded
    1.953 ms for a config that took 2.20-2.29 in every later run, against the default's 2.00 (H100). The study's
    best is then the fastest of these second timings, and the default is always among them."""
    from optuna.trial import TrialState

    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    finalists = {_frozen(params): params for params in [t.params for t in done[:FINALISTS]] + [mine]}
    retimed = []
    for params in finalists.values():
        reply = worker.run({**request, "params": {**default, **params}})
        if "ms" in reply:
            retimed.append([params, reply["ms"]])
    return retimed


def _frozen(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _default_ms(study, mine):
    from optuna.trial import TrialState

    return next((t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.params == mine), None)


def _postfix(bar, study, mine) -> None:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if done:
        best, base = min(t.value for t in done), _default_ms(study, mine)
        bar.set_postfix_str(f"best {best:.4f} ms" + (f" ({base / best:.2f}x default)" if base else ""))


def _summarise(study, key, default, mine, env, result) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # the finalists' second timings decide (_retime_finalists)
    retimed = {_frozen(params): ms for params, ms in study.user_attrs.get("retimed", [])}
    result.update(trials=len([t for t in trials if t.state != TrialState.WAITING]), failed=len(failed),
                  wrong=sum("wrong result" in t.user_attrs.get("error", "") for t in failed),
                  screened=sum(bool(t.user_attrs.get("screened")) for t in trials),
                  default_ms=retimed.get(_frozen(mine), _default_ms(study, mine)))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        result["error"] = "no trial completed"
        return result
    if retimed:
        params, ms = min(((dict(p), ms) for p, ms in retimed.items()), key=lambda pm: pm[1])
    else:
        best = min(done, key=lambda t: t.value)
        params, ms = best.params, best.value
    result.update(params={**default, **params}, ms=ms)
    result["recorded"] = configs.record(key, result["params"], ms, result["trials"], directory=env["directory"])
    return result


# ---- compiling ahead, in parallel ------------------------------------------------------------------

def warm_up(optuna, variant, studies, env, jobs, timeout_s, progress=True) -> dict:
    """Launch and check every config of every study's space once, in `jobs` child processes at once;
    returns {"launched", "failed": {(dtype, kernel, frozen params): why}, "seconds", "processes"}.

    Each child compiles and runs its share and checks the outputs against the default's, as a trial
    does, without timing (the children share the GPU). A config that fails here is a trial's failure
    the worker never runs: a crash or a miscompile there costs a new worker process and its inputs,
    ~10 s each on an H100 (Triton 3.6 miscompiles some configs, see launch.heuristic). A child whose
    CUDA context a config poisoned stops there; the rest of its share goes to a child of the next round.
    A child that dies, or runs one config longer than timeout_s, fails that config."""
    requests = {}  # one launch per binary: N is no compile-time constant, so a config compiles once for every length
    for study in studies:
        default = launch.heuristic(variant, study.kernel, interpreted=env["interpreted"], arch=env["arch"])
        dists = space(optuna, variant, study.kernel, default)
        for values in itertools.product(*(d.choices for d in dists.values())):
            params = {**default, **dict(zip(dists, values))}
            # a smaller batch: `jobs` children hold their inputs at once (16 full cases overflowed an H100's 80 GB)
            requests.setdefault((study.dtype, study.kernel, _frozen(params)),
                                {**study.request(variant, env, default, params), "b": max(1, study.b // jobs)})
    # dealt out in order: each child meets one (dtype, N, kernel)'s configs one after another and builds
    # that case's inputs and reference outputs once
    pending = sorted(requests, key=lambda key: (key[0], requests[key]["n"], key[1]))
    failed, launched, processes, start = {}, 0, 0, time.monotonic()
    while pending and time.monotonic() < env["deadline"]:
        shares = [[(key, requests[key]) for key in pending[i::jobs]] for i in range(min(jobs, len(pending)))]
        outcomes = _warm_round(shares, env, timeout_s)
        processes += len(shares)
        if not outcomes:  # no child got through one config (could not start?): the trial worker will say why
            break
        launched += sum(status == "ok" for status, _ in outcomes.values())
        failed.update((key, why) for key, (status, why) in outcomes.items() if status == "failed")
        pending = [key for key in pending if key not in outcomes]
    seconds = time.monotonic() - start
    if progress:
        print(f"warm-up: {launched + len(failed)} configs launched ({len(failed)} failed) in {seconds:.0f} s, "
              f"{processes} processes")
    return {"launched": launched, "failed": failed, "seconds": seconds, "processes": processes}


def _warm_round(shares, env, timeout_s) -> dict:
    """One child per share of (key, request)s; returns {key: (status, why)} for the configs they got through
    (status "ok", "failed" or "skipped": out of memory, no verdict on the config)."""
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in shares]  # a pipe, not a queue: a child's os._exit loses no message
    procs = [ctx.Process(target=_warm_main, args=([request for _, request in share], env["device"], sender),
                         name="lightgen-tune-warm-up") for share, (_, sender) in zip(shares, pipes)]
    for proc, (_, sender) in zip(procs, pipes):
        proc.start()
        sender.close()
    outcomes, running = {}, {}  # running: child -> (the key it is on, since when)
    listening = {receiver: c for c, (receiver, _) in enumerate(pipes)}
    while listening:
        for receiver in multiprocessing.connection.wait(list(listening), timeout=0.2):
            c = listening[receiver]
            try:
                index, status, why = receiver.recv()
            except EOFError:  # the child has gone: if in the middle of a config, that config killed it
                del listening[receiver]
                procs[c].join()
                if c in running:
                    outcomes[running.pop(c)[0]] = ("failed", f"warm-up process died (exit code {procs[c].exitcode})")
                continue
            key = shares[c][index][0]
            if status == "begin":
                running[c] = (key, time.monotonic())
            else:
                running.pop(c, None)
                outcomes[key] = (status, why)
        now = time.monotonic()
        for c, (key, since) in list(running.items()):
            if now - since > timeout_s:  # hung on it
                procs[c].kill()
                outcomes[key] = ("failed", f"timed out after {timeout_s:g} s")
                del running[c]
        if now >= env["deadline"]:
            for proc in procs:
                proc.kill()
            running.clear()
    for proc in procs:
        proc.join()
    return outcomes


def _warm_main(requests, device: str, messages) -> None:
    """Child of warm_up: launch and check each request's config, sending (index, "begin", None) before and
    (index, status, why) after each; stop where a config leaves the CUDA context unusable."""
    _choose_backend(device)
    cases: dict = {}
    for index, request in enumerate(requests):
        messages.send((index, "begin", None))
        fatal = False
        try:
            why = _check(request, cases, torch.device(device)).get("error")
            status, fatal = ("ok", False) if why is None else ("failed", True)  # a wrong result may have written out of bounds
        except torch.OutOfMemoryError as err:  # the machine's state, not the config's fault
            status, why = "skipped", _why(err)
        except Exception as err:  # noqa: BLE001 - a bad config is a result
            status, why, fatal = "failed", _why(err), not _healthy(device)
        messages.send((index, status, why))
        if fatal:
            return


# ---- the worker process ---------------------------------------------------------------------------

class _Worker:
    """A child process that runs trials, started on demand and replaced when a trial kills it, hangs
    (killed after timeout_s), poisons its CUDA context or computes wrong results (the child exits).
    A config that merely fails to compile or to fit in shared memory keeps the worker."""

    def __init__(self, device: str, timeout_s: float):
        self.device, self.timeout_s = device, timeout_s
        self.proc = self.conn = None

    def run(self, request: dict, timeout_s: float | None = None) -> dict:
        """The child's reply: {"ms", "rel_err"} for a good trial, {} for a prepare, or {"error"}."""
        timeout_s = timeout_s or self.timeout_s
        if self.proc is None:
            self._start()
        try:
            self.conn.send(request)
            if not self.conn.poll(timeout_s):
                self.stop(kill=True)
                return {"error": f"timed out after {timeout_s:g} s (worker killed)"}
            reply = self.conn.recv()
        except (EOFError, OSError):
            return {"error": f"worker process died (exit code {self.stop()})"}
        if reply.pop("fatal", False):
            self.stop()
        return reply

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would inherit the parent's CUDA state
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, self.device), name="lightgen-tune-worker")
        proc.start()
        child.close()
        self.proc, self.conn = proc, conn
        try:
            ready = self.conn.poll(STARTUP_TIMEOUT_S) and self.conn.recv()
        except (EOFError, OSError):
            ready = False
        if not ready:
            raise RuntimeError(f"tune: the trial worker process did not start (exit code {self.stop(kill=True)})")

    def stop(self, kill: bool = False):
        """End the child (it exits when the pipe closes); returns its exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        self.conn.close()
        if not kill:
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        proc.join()
        return proc.exitcode


def _worker_main(conn, device: str) -> None:
    """Child: serve requests until the pipe closes or a failure leaves its CUDA context unusable."""
    _choose_backend(device)
    conn.send({"ready": True})
    cases: dict = {}
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = _serve(request, cases, torch.device(device))
        except Exception as err:  # noqa: BLE001 - any failure of a config is a result
            reply = {"error": _why(err), "fatal": not _healthy(device)}
        conn.send(reply)
        if reply.get("fatal"):
            return


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip()[:500]}"


def _choose_backend(device: str) -> None:
    """In a child, before any kernel module is imported (that is when the interpreter is chosen)."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.pop("LIGHTGEN_CPU_REFERENCE", None)  # the reference path launches no kernels
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        torch.cuda.set_device(torch.device(device))


def _healthy(device: str) -> bool:
    """False when the CUDA context is poisoned (e.g. after an illegal memory access)."""
    if device == "cpu":
        return True
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device=device).add(1).item() == 2
    except Exception:  # noqa: BLE001
        return False


def _case(request: dict, cases: dict, device: torch.device) -> "_Case":
    """The request's inputs and captured launches, built once while consecutive requests share them."""
    case_key = tuple(request[k] for k in ("spec", "dtype", "n", "b", "h"))
    if case_key not in cases:
        cases.clear()  # one case at a time: inputs at N=64K are big
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cases[case_key] = _Case(*case_key, device)
    return cases[case_key]


def _check(request: dict, cases: dict, device: torch.device) -> dict:
    """Run the request's config once against the default's outputs: {"rel_err", "kernel"}, {} for a
    prepare (params None), or {"error", "fatal"} for a wrong result."""
    kernel = _case(request, cases, device).kernel(request["kernel"], request["default"])
    params = request["params"]
    if params is None:
        return {}
    _inject_fault(params, request["default"], kernel)
    err = kernel.error(params)
    tol = AGREE[request["dtype"]]
    if not err < tol:  # NaN fails too. Fatal: a miscompiled kernel may also have written out of bounds
        return {"error": f"wrong result: relative error {err:.2e} against the default config (limit {tol:g})",
                "fatal": True}
    return {"rel_err": err, "kernel": kernel}


def _serve(request: dict, cases: dict, device: torch.device) -> dict:
    checked = _check(request, cases, device)
    if "kernel" not in checked:
        return checked
    kernel, params, err = checked["kernel"], request["params"], checked["rel_err"]
    beat = request.get("beat_ms")
    if beat is not None:
        quick = kernel.time_ms(params, quick=True)
        if quick > SCREEN * beat:
            return {"ms": quick, "rel_err": err, "screened": True}
    return {"ms": kernel.time_ms(params), "rel_err": err}


def _inject_fault(params: dict, default: dict, kernel: "_Kernel") -> None:
    """Test hook, LIGHTGEN_TUNE_FAULT=exit|raise|hang|wrong: every trial but the default's misbehaves
    the way a bad config can (the process dies, the launch raises, the kernel never finishes, or it
    writes nothing: its outputs stay NaN)."""
    mode = os.environ.get("LIGHTGEN_TUNE_FAULT")
    if not mode or params == default:
        return
    if mode == "exit":
        os._exit(70)
    if mode == "hang":
        time.sleep(3600)
    if mode == "wrong":
        kernel.launch = lambda: None  # harmless to later trials: a wrong result ends this worker
        return
    raise RuntimeError(f"injected fault (LIGHTGEN_TUNE_FAULT={mode})")


class _Case:
    """Random inputs of one (variant, dtype, B, N, H) and the launches of one forward + backward."""

    def __init__(self, spec, dtype, n, b, h, device):
        from . import ops
        from .spec import tnl_slopes
        from .verify import random_log_decays

        self.attn = ops.compile(spec)
        variant = self.attn.variant
        self.device = device
        g = torch.Generator(device=device).manual_seed(0)
        dt = configs.torch_dtype(dtype)

        def randn(d, scale=1.0):
            return (torch.randn(b, n, h, d, device=device, generator=g) * scale).to(dt)

        self.q, self.k = randn(variant.dk, variant.dk ** -0.25), randn(variant.dk, variant.dk ** -0.25)
        self.v, self.do = randn(variant.dv), randn(variant.dv)
        self.slopes = torch.tensor(tnl_slopes(h), device=device) if variant.decay == "constant" else None
        self.theta = torch.rand(h, variant.dk, device=device, generator=g) * 0.5 if variant.lrpe == "d" else None
        self.g = random_log_decays(b, n, h, torch.Generator().manual_seed(0),
                                   dims=variant.dk if variant.decay == "vector" else None).to(device) \
            if variant.learned_decay else None
        self.u = randn(variant.dv) if variant.gate != "none" else None  # the fused epilogue's gate input
        self.launches = self._capture()
        self.kernels: dict = {}

    def _capture(self) -> dict:
        """kernel name -> (args, kwargs) of its ops._launch call in one forward + backward (ops.record_launches:
        replaying these calls keeps how ops builds a kernel's arguments in one place, ops)."""
        from . import ops

        extra = {name: t for name, t in (("slopes", self.slopes), ("g", self.g), ("u", self.u)) if t is not None}
        return ops.record_launches(self.attn, self.q, self.k, self.v, self.do, theta=self.theta, **extra)

    def kernel(self, name: str, default: dict) -> "_Kernel":
        if name not in self.kernels:
            self.kernels.clear()  # keep one set of reference outputs
            args, kwargs = self.launches[name]
            self.kernels[name] = _Kernel(args, kwargs, default, (self.q, self.k, self.v, self.do), self.device)
        return self.kernels[name]


class _Kernel:
    """One captured launch: which tensors it writes, the default config's outputs, trials against them."""

    def __init__(self, args, kwargs, default, inputs, device):
        from . import ops

        self.launch = lambda: ops._launch(*args, **kwargs)
        self.default, self.device = default, device
        known = {t.data_ptr() for t in inputs}
        candidates = [t for t in (*_tensors(args), *_tensors(kwargs.values()))
                      if t.is_floating_point() and t.data_ptr() not in known]
        self.outputs = [t for t in candidates if self._writes(t)]
        if not self.outputs:
            raise RuntimeError("the default config wrote none of the kernel's tensor arguments")
        self._run(default)
        self.reference = [t.clone() for t in self.outputs]

    def _run(self, params) -> None:
        with launch.override(params):
            self.launch()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _writes(self, t) -> bool:
        """Fill with NaN, run the default config: an output comes back overwritten, an input is restored."""
        keep = t.clone()
        t.fill_(math.nan)
        self._run(self.default)
        if torch.isnan(t).any():
            t.copy_(keep)
            return False
        return True

    def error(self, params) -> float:
        """Largest relative error of the outputs against the default's (NaN-filled first: unwritten fails)."""
        for t in self.outputs:
            t.fill_(math.nan)
        self._run(params)
        errs = [((t.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
                for t, r in zip(self.outputs, self.reference)]
        return math.nan if any(math.isnan(e) for e in errs) else max(errs)

    def time_ms(self, params, quick=False) -> float:
        """Median of do_bench over ~100 ms of runs; quick: over ~20 ms (screening)."""
        with launch.override(params):
            if self.device.type == "cuda":
                from triton.testing import do_bench
                return do_bench(self.launch, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median")
            times = []  # the interpreter (dry run): wall clock, only to exercise the pipeline
            for _ in range(3):
                start = time.perf_counter()
                self.launch()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e3


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)

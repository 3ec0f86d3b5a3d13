"""tnl.distributed on CPU: gloo, 2 to 4 processes, tiny model (hidden 64, 4 heads of 16, LRPE in layer 0).

Against a single-process run of the same model and batch: TP on 2 ranks; SP on 2 and 4 ranks (both
ways of adding the earlier ranks' state); TP + FSDP2 on a 2x2 (dp, tp) mesh; SP x TP on 2x2. Then a
DCP checkpoint saved on 4 ranks loads on 2, and tnl.train_dist trains on 4 ranks and resumes on 2.

Each test starts its ranks as plain subprocesses of this file (`python tests/test_distributed.py
SCENARIO OUT_DIR` with torchrun's RANK / WORLD_SIZE / MASTER_* variables and a free port), so it
runs the same under pytest-xdist. Every rank also runs the single-process model on the full batch;
rank 0 writes the numbers to OUT_DIR/result-SCENARIO.json and the test checks them. Attention runs
lightgen's PyTorch reference (LIGHTGEN_CPU_REFERENCE=1), except in the 2-rank SP test, which runs
the generated kernels under Triton's interpreter (states in and out, LRPE offsets).

test_on_gpus_with_nccl runs the scenarios again with one GPU per rank and NCCL, the
attention in the compiled kernels, on machines with enough GPUs (skipped elsewhere).

Tolerances (fp32): loss within 1e-5 relative, each gradient within 1e-4 relative (norm-wise); only
the order of floating-point sums differs (all-reduces, chunked states). Seen: about 1e-6.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tnl.distributed.sequence_parallel import METHODS

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4


# ---- the parent side ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario, world, out_dir, kernels=False, timeout=150, command=None, device="cpu"):
    """Run `world` ranks of a scenario (or of `command`, an argv after python, named scenario) on
    `device` (cuda: one GPU per rank, NCCL); fail with the first failing rank's log; return the
    scenario's result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TEST_DIST_DEVICE": device}
    if kernels:
        env.update(TRITON_INTERPRET="1", LIGHTGEN_CPU_REFERENCE="0")
    else:
        env["LIGHTGEN_CPU_REFERENCE"] = "1"
    procs, logs = [], []
    for rank in range(world):
        log = open(out_dir / f"{scenario}-rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *(command or [__file__, scenario, str(out_dir)])], cwd=ROOT,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                rank = failed[0] if failed else 0
                reason = f"rank {rank} exited with {procs[rank].returncode}" if failed else f"timeout after {timeout}s"
                tail = (out_dir / f"{scenario}-rank{rank}.log").read_text()[-4000:]
                pytest.fail(f"{scenario} on {world} ranks: {reason}; its log ends:\n{tail}")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            tail = (out_dir / f"{scenario}-rank{rank}.log").read_text()[-4000:]
            pytest.fail(f"{scenario} on {world} ranks: rank {rank} exited with {p.returncode}:\n{tail}")
    return None if command else json.loads((out_dir / f"result-{scenario}.json").read_text())


def check_matches(result):
    assert abs(result["loss"] - result["ref_loss"]) <= LOSS_TOL * abs(result["ref_loss"]), result
    bad = {name: err for name, err in result["grad_errors"].items() if not err <= GRAD_TOL}
    assert not bad, f"gradients off by more than {GRAD_TOL}: {bad}"
    assert len(result["grad_errors"]) == result["num_params"]


def test_one_rank_keeps_plain_tensors(tmp_path):
    check_matches(launch("one", 1, tmp_path))


def test_tensor_parallel_2_ranks(tmp_path):
    result = launch("tp", 2, tmp_path)
    check_matches(result)


@pytest.mark.parametrize("world, kernels", [(2, True), (4, False)], ids=["2ranks-kernels", "4ranks-reference"])
def test_sequence_parallel(tmp_path, world, kernels, request):
    if kernels:  # the ranks run the kernels on the CPU
        request.getfixturevalue("interpreter")
    result = launch(f"sp{world}", world, tmp_path, kernels=kernels)
    for method in METHODS:
        check_matches(result[method])


def test_tensor_parallel_with_fsdp_2x2(tmp_path):
    check_matches(launch("tp_fsdp", 4, tmp_path))


def test_sequence_and_tensor_parallel_2x2(tmp_path):
    """SP over 2 ranks x TP over 2, with FSDP2 (HSDP: replicas over sp) averaging the gradients."""
    check_matches(launch("sp_tp", 4, tmp_path))


@pytest.mark.parametrize("scenario, world", [("one", 1), ("tp", 2), ("sp2", 2), ("tp_fsdp", 4), ("sp4", 4), ("sp_tp", 4)])
def test_on_gpus_with_nccl(tmp_path, scenario, world):
    """The same scenarios with one GPU per rank and NCCL; attention runs the compiled kernels (fp32,
    IEEE dots: the tolerances above hold). Runs where the machine has enough GPUs (issue 8)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    result = launch(scenario, world, tmp_path, timeout=400, device="cuda")
    for matches in (result.values() if scenario.startswith("sp") else [result]):
        check_matches(matches)


def test_checkpoint_saved_on_4_ranks_loads_on_2(tmp_path):
    saved = launch("save", 4, tmp_path)
    loaded = launch("load", 2, tmp_path)
    # the loss of the saved weights; then one more step, which needs the optimizer state too
    assert loaded["loss_before"] == pytest.approx(saved["loss_before"], rel=LOSS_TOL)
    assert loaded["loss_after"] == pytest.approx(saved["loss_after"], rel=LOSS_TOL)
    assert saved["loss_after"] < saved["loss_before"]
    # the one-GPU export of the loaded model gives the same loss as the distributed one
    assert loaded["exported_loss"] == pytest.approx(loaded["loss_before"], rel=LOSS_TOL)


def test_train_dist_runs_and_resumes_on_another_mesh(tmp_path, corpus_dir):
    out = tmp_path / "run"
    common = ["-m", "tnl.train_dist", "--config", "tiny", "--num-heads", "4", "--batch-size", "4", "--seq-len", "64",
              "--eval-every", "2", "--eval-batches", "1", "--save-every", "2", "--max-bytes", "100000",
              "--data-dir", corpus_dir, "--out", str(out), "--device", "cpu", "--quiet"]
    # 4 ranks: sp 2 x tp 2, then resume on 2 ranks: dp 2
    launch("train", 4, tmp_path, command=[*common, "--mesh", "1,2", "--sp", "2", "--steps", "4"])
    launch("resume", 2, tmp_path, command=[*common, "--mesh", "2,1", "--steps", "6", "--resume", "--export"])
    assert "resumed from" in (tmp_path / "resume-rank0.log").read_text()
    history = json.loads((out / "metrics.json").read_text())
    assert [step for step, _ in history["train"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in history["eval"]] == [0, 2, 4, 6]
    assert all(5.0 < loss < 6.0 for _, loss in history["train"])  # ~log(256) = 5.55 at the start
    from tnl import TNLForCausalLM

    model = TNLForCausalLM.from_pretrained(out / "model")
    assert model.config.num_heads == 4


def test_bench_dist_on_2_ranks(tmp_path):
    """tools/bench_dist with sequence parallelism over 2 ranks and activation checkpointing."""
    out = tmp_path / "dist.json"
    launch("bench_dist", 2, tmp_path, command=[
        "-m", "tools.bench_dist", "--config", "tiny", "--device", "cpu", "--sp", "2", "--checkpoint",
        "--contexts", "32,64", "--steps", "1", "--warmup", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["mesh"] == {"dp": 1, "sp": 2, "tp": 1}
    assert [row["context"] for row in result["rows"]] == [32, 64]
    for row in result["rows"]:
        assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_gpu"])
        assert 5.0 < row["loss"] < 6.0  # ~log(256) at the start


# ---- the rank side -------------------------------------------------------------------------------

DEVICE = torch.device("cpu")  # this rank's device; main() sets it from TEST_DIST_DEVICE


def make_model(seed=0, **overrides):
    from tnl import TNLConfig, TNLForCausalLM

    torch.manual_seed(seed)  # the same weights on every rank; init_std 0.1 so that attention matters
    config = TNLConfig(hidden_size=64, num_layers=2, num_heads=4, glu_dim=128, lrpe_layers=[0], init_std=0.1,
                       **overrides)
    return TNLForCausalLM(config).to(DEVICE)


def make_batch(rows, length, seed=1):
    x = torch.randint(0, 256, (rows, length + 1), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return x[:, :-1], x[:, 1:]


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def reference_run(model, x, y):
    """Loss and gradients of the single-process model (a copy, so `model` keeps no gradients)."""
    import copy

    ref = copy.deepcopy(model)
    loss = ref.loss(x, y)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in ref.named_parameters()}


def full_gradients(model):
    """Every gradient as a whole tensor in the single-process layout."""
    from torch.distributed.tensor import DTensor

    from tnl.distributed import standard_state_dict

    grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters()}
    return standard_state_dict(grads, model.config)


def compare(loss, grads, ref_loss, ref_grads):
    return {"loss": loss, "ref_loss": ref_loss, "num_params": len(ref_grads),
            "grad_errors": {name: rel_err(grads[name], g) for name, g in ref_grads.items()}}


def mean_over_world(value):
    import torch.distributed as dist

    value = torch.as_tensor(value, dtype=torch.float64, device=DEVICE).clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def scenario_tp(out):
    from torch.distributed.device_mesh import init_device_mesh

    from tnl.distributed import parallelize_tnl

    tp_mesh = init_device_mesh(DEVICE.type, (2,), mesh_dim_names=("tp",))
    try:
        parallelize_tnl(make_model(tie_word_embeddings=True), tp_mesh)
        raise AssertionError("tied embeddings were split over 2 ranks")
    except NotImplementedError:
        pass
    model = make_model()
    x, y = make_batch(2, 32)
    ref_loss, ref_grads = reference_run(model, x, y)
    parallelize_tnl(model, tp_mesh)
    loss = model.loss(x, y)
    loss.backward()
    return compare(loss.item(), full_gradients(model), ref_loss, ref_grads)


def scenario_one(out):
    """parallelize on a world of one: no DTensors, no FSDP (host time), the same numbers; tied
    embeddings too (nothing is sharded)."""
    from torch.distributed.tensor import DTensor

    from tnl.distributed import make_mesh, parallelize

    model = make_model(tie_word_embeddings=True)
    x, y = make_batch(2, 32)
    ref_loss, ref_grads = reference_run(model, x, y)
    parallelize(model, make_mesh(dp=1, sp=1, tp=1, device_type=DEVICE.type))
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    loss = model.loss(x, y)
    loss.backward()
    return compare(loss.item(), full_gradients(model), ref_loss, ref_grads)


def scenario_sp(out):
    import torch.distributed as dist

    from tnl.distributed import enable_sequence_parallel, split_sequence

    model = make_model()
    x, y = make_batch(2, 64)
    ref_loss, ref_grads = reference_run(model, x, y)
    group = dist.group.WORLD
    results = {}
    for method in METHODS:
        enable_sequence_parallel(model, group, method)
        model.zero_grad(set_to_none=True)
        loss = model.loss(split_sequence(x, group), split_sequence(y, group))
        loss.backward()
        # what FSDP does in training: average the replicas' gradients (each rank's loss is the mean
        # over its tokens, so the average is the gradient of the mean over the whole sequence)
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad / dist.get_world_size()
        results[method] = compare(mean_over_world(loss.item()), grads, ref_loss, ref_grads)
    return results


def scenario_tp_fsdp(out):
    import torch.distributed as dist

    from tnl.distributed import make_mesh, parallelize

    model = make_model()
    x, y = make_batch(4, 32)
    ref_loss, ref_grads = reference_run(model, x, y)
    mesh = make_mesh(dp=2, sp=1, tp=2, device_type=DEVICE.type)
    parallelize(model, mesh)
    rows = slice(2 * mesh["dp"].get_local_rank(), 2 * mesh["dp"].get_local_rank() + 2)
    loss = model.loss(x[rows], y[rows])
    loss.backward()  # FSDP averages over dp
    assert dist.get_world_size() == 4
    return compare(mean_over_world(loss.item()), full_gradients(model), ref_loss, ref_grads)


def scenario_sp_tp(out):
    import torch.distributed as dist

    from tnl.distributed import make_mesh, parallelize, split_sequence

    model = make_model()
    x, y = make_batch(2, 64)
    ref_loss, ref_grads = reference_run(model, x, y)
    mesh = make_mesh(dp=1, sp=2, tp=2, device_type=DEVICE.type)
    parallelize(model, mesh)
    group = mesh["sp"].get_group()
    loss = model.loss(split_sequence(x, group), split_sequence(y, group))
    loss.backward()  # HSDP averages over the sp replicas
    assert dist.get_world_size() == 4
    return compare(mean_over_world(loss.item()), full_gradients(model), ref_loss, ref_grads)


def _train_setup(dp, tp, seed):
    from tnl.distributed import make_mesh, parallelize

    model, mesh = make_model(seed), make_mesh(dp=dp, sp=1, tp=tp, device_type=DEVICE.type)
    parallelize(model, mesh)
    return model, mesh, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _local_loss(model, mesh, x, y):
    rows = x.shape[0] // mesh["dp"].size()
    r = mesh["dp"].get_local_rank() * rows
    return model.loss(x[r:r + rows], y[r:r + rows])


def _step_and_measure(model, mesh, optimizer, x, y):
    loss = _local_loss(model, mesh, x, y)
    before = mean_over_world(loss.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = mean_over_world(_local_loss(model, mesh, x, y).item())
    return before, after


def scenario_save(out):
    from tnl.distributed import checkpoint

    model, mesh, optimizer = _train_setup(dp=2, tp=2, seed=0)
    x, y = make_batch(4, 32, seed=1)
    _step_and_measure(model, mesh, optimizer, x, y)  # a step, so the optimizer has state to save
    checkpoint.save(Path(out) / "ckpt", model, optimizer, {"step": 1})
    x, y = make_batch(4, 32, seed=2)
    before, after = _step_and_measure(model, mesh, optimizer, x, y)
    return {"loss_before": before, "loss_after": after}


def scenario_load(out):
    import torch.distributed as dist

    from tnl import TNLForCausalLM
    from tnl.distributed import checkpoint

    model, mesh, optimizer = _train_setup(dp=1, tp=2, seed=123)  # other weights: the load must replace them
    state = checkpoint.load(Path(out) / "ckpt", model, optimizer)
    assert state == {"step": 1}, state
    x, y = make_batch(4, 32, seed=2)
    checkpoint.export_pretrained(model, Path(out) / "exported")  # before the step: the saved weights
    exported = None
    if dist.get_rank() == 0:
        exported = TNLForCausalLM.from_pretrained(Path(out) / "exported").loss(x, y).item()
    before, after = _step_and_measure(model, mesh, optimizer, x, y)
    return {"loss_before": before, "loss_after": after, "exported_loss": exported}


SCENARIOS = {"one": scenario_one, "tp": scenario_tp, "sp2": scenario_sp, "sp4": scenario_sp, "tp_fsdp": scenario_tp_fsdp,
             "sp_tp": scenario_sp_tp, "save": scenario_save, "load": scenario_load}


def main(scenario, out):
    import torch.distributed as dist

    from tnl.train_dist import init_distributed

    global DEVICE
    torch.set_num_threads(1)
    DEVICE = init_distributed(os.environ["TEST_DIST_DEVICE"], timeout_s=120)
    try:
        result = SCENARIOS[scenario](out)
        if dist.get_rank() == 0:
            (Path(out) / f"result-{scenario}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Tuned-config store (lightgen.configs): lookup, record, import/export/merge, robustness."""
import json
import multiprocessing
import os
import warnings
from dataclasses import asdict

import pytest

from lightgen import configs
from lightgen.configs import ConfigKey, ConfigStoreWarning

GPU = "NVIDIA H100 80GB HBM3"


def key(n=1024, **kw):
    fields = dict(arch="sm90", gpu=GPU, triton="3.6", variant="v1", kernel="fwd",
                  dk=128, dv=128, dtype="bf16", n_bucket=n)
    fields.update(kw)
    return ConfigKey(**fields)


def look(n, **kw):
    k = key(**kw)
    return configs.lookup(k.arch, k.gpu, k.triton, k.variant, k.kernel, k.dk, k.dv, k.dtype, n)


def params(c):
    return {"C": c, "BV": 64, "num_warps": 4, "num_stages": 2, "split": 1}




# ---------------------------------------------------------------------------------------------
# keys, buckets, lookup

def test_n_bucket_rounds_up_to_power_of_two():
    assert [configs.n_bucket(n) for n in (0, 1, 2, 3, 5, 1000, 1024, 1025, 65536)] == \
        [1, 1, 2, 4, 8, 1024, 1024, 2048, 65536]


def test_key_validation_and_normalisation():
    with pytest.raises(ValueError):
        key(n=1000)  # not a power of two
    with pytest.raises(ValueError):
        key(arch="../evil")  # arch becomes a file name
    with pytest.raises(ValueError):
        key(dk=True)
    k = key(triton="3.6.0+git1234", dtype="bfloat16")
    assert (k.triton, k.dtype) == ("3.6", "bf16")


def test_current_arch_without_cuda_is_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        arch, gpu = configs.current_arch()
        assert arch.startswith("sm") and gpu
    else:
        assert configs.current_arch() == ("cpu", "cpu")


def test_nearest_bucket(store):
    configs.record(key(512), params(16), 1.0, 5)
    configs.record(key(4096), params(128), 1.0, 5)
    assert look(512)["C"] == 16
    assert look(600)["C"] == 16       # bucket 1024: 1 step from 512, 2 from 4096
    assert look(2048)["C"] == 128     # 2 steps from 512, 1 from 4096
    assert look(1)["C"] == 16
    assert look(1 << 20)["C"] == 128
    configs.record(key(1024), params(32), 1.0, 5)
    assert look(2048)["C"] == 128     # tie 1024 / 4096 goes to the larger bucket
    assert look(1024)["C"] == 32


def test_miss_returns_none(store):
    assert look(1024) is None                       # no file at all
    configs.record(key(1024), params(64), 1.0, 5)
    assert look(1024) == params(64)
    assert look(1024, dk=64) is None
    assert look(1024, kernel="bwd") is None
    assert look(1024, dtype="fp16") is None
    assert look(1024, variant="other") is None
    assert look(1024, arch="sm80") is None
    assert look(1024, arch="sm80", gpu="NVIDIA A100") is None  # another arch's GPU never serves


def test_another_gpu_of_the_same_arch_serves_a_miss(store, monkeypatch):
    monkeypatch.setattr(configs, "_warned_sibling", set())
    configs.record(key(1024, gpu="GPU A"), params(16), 1.0, 5)
    configs.record(key(1024, gpu="GPU B"), params(32), 1.0, 5)
    configs.record(key(8192, gpu="GPU B"), params(64), 1.0, 5)
    with pytest.warns(ConfigStoreWarning, match="using those tuned on GPU B"):
        assert look(1024, gpu="NVIDIA H200")["C"] == 32   # B has more buckets
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # said once
        assert look(8192, gpu="NVIDIA H200")["C"] == 64
        assert look(1024, gpu="GPU A")["C"] == 16          # a GPU's own entries win
        assert look(1024, gpu="NVIDIA H200", dtype="fp16") is None  # the rest of the key still has to match


def test_lookup_returns_a_copy(store):
    configs.record(key(), params(64), 1.0, 5)
    look(1024)["C"] = 999
    assert look(1024)["C"] == 64


def test_user_store_overrides_shipped(store):
    user, shipped = store
    configs.record(key(1024), params(16), 1.0, 5, directory=shipped)
    configs.record(key(8192), params(256), 1.0, 5, directory=shipped)
    assert look(1024)["C"] == 16
    configs.record(key(1024), params(32), 9.0, 5)   # slower, but the user store still wins
    assert look(1024)["C"] == 32
    assert look(8192)["C"] == 256                    # shipped-only bucket still visible
    listed = dict(configs.entries())
    assert listed[key(1024)]["params"]["C"] == 32 and listed[key(8192)]["params"]["C"] == 256


# ---------------------------------------------------------------------------------------------
# record / file format

def test_record_faster_wins_and_file_format(store):
    user, _ = store
    assert configs.record(key(), params(32), 2.0, 10) is True
    assert configs.record(key(), params(64), 3.0, 10) is False   # slower: not written
    assert look(1024)["C"] == 32
    assert configs.record(key(), params(128), 1.0, 20) is True   # faster: replaces
    assert look(1024)["C"] == 128
    configs.record(key(2048), params(16), 1.0, 1)

    text = (user / "sm90.json").read_text()
    assert text.startswith('{\n "format": 1,')                   # indent=1
    doc = json.loads(text)
    assert doc["format"] == 1
    assert [e["key"]["n_bucket"] for e in doc["entries"]] == [1024, 2048]   # sorted
    value = doc["entries"][0]["value"]
    assert value["ms"] == 1.0 and value["trials"] == 20 and value["params"]["C"] == 128
    assert len(value["date"]) == 10 and value["date"][4] == "-"
    assert not list(user.glob("*.tmp"))                            # temp file renamed away


def test_record_rejects_bad_values(store):
    with pytest.raises(ValueError):
        configs.record(key(), params(64), float("nan"), 5)
    with pytest.raises(ValueError):
        configs.record(key(), params(64), 1.0, -1)


# ---------------------------------------------------------------------------------------------
# export / import / merge

def test_export_import_round_trip(store, tmp_path):
    for i, n in enumerate((256, 1024, 4096)):
        configs.record(key(n), params(16 << i), 1.0 + i, 3)
    configs.record(key(1024, arch="sm80", gpu="NVIDIA A100"), params(32), 2.0, 3)
    out = tmp_path / "export.json"
    assert configs.export_entries(out) == 4

    other = tmp_path / "other"
    assert configs.import_entries(out, directory=other) == 4
    assert configs.entries(other) == configs.entries()
    assert sorted(p.name for p in other.glob("*.json")) == ["sm80.json", "sm90.json"]
    assert configs.import_entries(out, directory=other) == 0      # nothing new or faster


def test_import_keeps_faster(store, tmp_path):
    configs.record(key(1024), params(32), 1.0, 3)
    configs.record(key(2048), params(32), 5.0, 3)
    src = tmp_path / "src"
    configs.record(key(1024), params(64), 2.0, 3, directory=src)   # slower than the store
    configs.record(key(2048), params(64), 1.0, 3, directory=src)   # faster than the store
    configs.record(key(4096), params(64), 1.0, 3, directory=src)   # new
    assert configs.import_entries(src / "sm90.json") == 2
    assert look(1024)["C"] == 32 and look(2048)["C"] == 64 and look(4096)["C"] == 64


def test_merge_files_keeps_faster(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    configs.record(key(1024), params(1), 1.0, 3, directory=a)
    configs.record(key(2048), params(1), 5.0, 3, directory=a)
    configs.record(key(2048), params(2), 2.0, 3, directory=b)
    configs.record(key(1024), params(2), 3.0, 3, directory=b)
    configs.record(key(4096), params(2), 3.0, 3, directory=b)
    out = tmp_path / "merged" / "sm90.json"
    assert configs.merge_files(a / "sm90.json", b / "sm90.json", out) == 3
    got = {k.n_bucket: v for k, v in configs.entries(out.parent)}
    assert {n: v["params"]["C"] for n, v in got.items()} == {1024: 1, 2048: 2, 4096: 2}
    assert got[2048]["ms"] == 2.0


def test_rekey_moves_entries_and_keeps_the_faster_on_a_clash(tmp_path):
    configs.record(key(1024, variant="old"), params(1), 2.0, 3, directory=tmp_path)
    configs.record(key(2048, variant="old"), params(1), 1.0, 3, directory=tmp_path)
    configs.record(key(1024, variant="new"), params(2), 3.0, 3, directory=tmp_path)  # slower: replaced
    configs.record(key(2048, variant="new"), params(2), 0.5, 3, directory=tmp_path)  # faster: stays
    configs.record(key(1024, variant="old", kernel="bwd_dq"), params(3), 1.0, 3, directory=tmp_path)  # not named
    path = tmp_path / "sm90.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "entries": doc["entries"] + ["not an entry"]}))
    with pytest.warns(ConfigStoreWarning, match="1 unreadable"):
        assert configs.rekey(path, {("old", "fwd"): "new", ("gone", "fwd"): "x"}) == 2
    with pytest.warns(ConfigStoreWarning, match="1 unreadable"):
        got = {(k.variant, k.kernel, k.n_bucket): v["params"]["C"] for k, v in configs.entries(tmp_path)}
    assert got == {("new", "fwd", 1024): 1, ("new", "fwd", 2048): 2, ("old", "bwd_dq", 1024): 3}
    assert json.loads(path.read_text())["entries"][-1] == "not an entry"  # carried along


# the variants tuned on the H100: spec -> (dtypes, kernels; None: launch.kernels(variant))
SHIPPED = {
    "decay=constant,causal,dk=128,dv=128": (("bf16", "fp16"), None),
    "decay=constant,causal,dk=64,dv=64": (("bf16", "fp16"), None),
    "decay=none,causal,dk=128,dv=128": (("bf16", "fp16"), None),
    "decay=none,causal,dk=64,dv=64": (("bf16", "fp16"), None),
    "decay=constant,causal,phi=silu,dk=128,dv=128": (("bf16", "fp16"), None),  # tnl's layers 1..L-1
    # tnl's first layer: its fused bwd_dkv (5 ms against 3.4 split) has no entry, so it takes the split backward
    "decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128,scale=1": (("bf16",), ("fwd", "bwd_dq", "bwd_dk", "bwd_dv")),
    "decay=scalar,causal,dk=128,dv=128": (("bf16",), None),
    "decay=vector,causal,dk=128,dv=128": (("bf16",), None),
    "decay=none,noncausal,dk=128,dv=128": (("bf16", "fp16"), None),  # session 24
    "decay=none,noncausal,dk=64,dv=64": (("bf16", "fp16"), None),
    "decay=constant,noncausal,dk=128,dv=128": (("bf16", "fp16"), None),  # session 30 (1K-8K)
}


def test_the_shipped_entries_are_keyed_by_kernels_of_the_current_templates():
    """Every shipped entry is found by the key lookups use now, and every tuned variant's kernel has its
    entries: a template change that moves a kernel's key shows here, not as a silent fall-back to the
    heuristic on the GPU (or as entries nothing looks up)."""
    from lightgen import launch, render
    from lightgen.spec import Variant

    shipped = {(k.variant, k.kernel, k.dk, k.dv, k.dtype) for k, _ in configs.entries(configs.shipped_dir())}
    wanted = set()
    for spec, (dtypes, kernels) in SHIPPED.items():
        variant = Variant.parse(spec)
        for kernel in kernels or launch.kernels(variant):
            for dtype in dtypes:
                wanted.add((render.kernel_key(variant, kernel), kernel, variant.dk, variant.dv, dtype))
    assert sorted(wanted - shipped) == [], "tuned kernels without entries (re-tune, or configs.rekey)"
    assert sorted(shipped - wanted) == [], "shipped entries that no lookup finds (stale keys)"


# ---------------------------------------------------------------------------------------------
# robustness

def _valid_file_bytes(tmp_path):
    d = tmp_path / "valid"
    configs.record(key(1024), params(64), 1.0, 3, directory=d)
    return (d / "sm90.json").read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "not_utf8", "wrong_format", "no_entries",
                                  "top_level_list"])
def test_corrupt_file_warns_and_falls_back(store, tmp_path, kind):
    user, shipped = store
    configs.record(key(1024), params(16), 1.0, 3, directory=shipped)
    blob = {
        "truncated": _valid_file_bytes(tmp_path)[:-40],
        "garbage": b"<<<<<<< HEAD\n{]",
        "not_utf8": b"\xff\xfe\x00{",
        "wrong_format": json.dumps({"format": 2, "entries": []}).encode(),
        "no_entries": json.dumps({"format": 1}).encode(),
        "top_level_list": b"[]",
    }[kind]
    user.mkdir()
    (user / "sm90.json").write_bytes(blob)
    with pytest.warns(ConfigStoreWarning, match="sm90.json"):
        got = look(1024)
    assert got["C"] == 16                         # shipped entry still used
    assert look(1024, variant="missing") is None  # misses still just miss
    assert configs.entries(user) == []


def test_bad_entries_skipped_and_kept_on_rewrite(store):
    user, _ = store
    good = {"key": asdict(key(1024)), "value": {"params": params(64), "ms": 1.0,
                                                    "date": "2025-01-01", "trials": 3}}
    bad = [
        {"key": {**asdict(key(1024)), "n_bucket": 1000}, "value": good["value"]},
        {"key": {"arch": "sm90"}, "value": good["value"]},
        {"key": asdict(key(2048)), "value": {"params": {}, "ms": "fast"}},
        "not an entry",
    ]
    user.mkdir()
    (user / "sm90.json").write_text(json.dumps({"format": 1, "entries": [bad[0], good] + bad[1:]}))
    with pytest.warns(ConfigStoreWarning, match="sm90.json.*4 unreadable"):
        assert look(1024)["C"] == 64
    assert look(2048)["C"] == 64                  # the bad 2048 entry is ignored, nearest used

    with pytest.warns(ConfigStoreWarning, match="4 unreadable"):  # reparsed after the write
        assert configs.record(key(4096), params(128), 1.0, 3)
        assert look(4096)["C"] == 128
    doc = json.loads((user / "sm90.json").read_text())
    assert [e["key"]["n_bucket"] for e in doc["entries"][:2]] == [1024, 4096]
    assert doc["entries"][2:] == bad              # carried along verbatim


def test_corrupt_file_moved_aside_on_write(store, tmp_path):
    user, _ = store
    user.mkdir()
    blob = _valid_file_bytes(tmp_path)[:-10]
    (user / "sm90.json").write_bytes(blob)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert configs.record(key(2048), params(32), 1.0, 3)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigStoreWarning)]
    assert any("not valid JSON" in m for m in messages)
    assert any("moved it aside" in m for m in messages)
    aside = list(user.glob("sm90.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == blob
    assert json.loads((user / "sm90.json").read_text())["format"] == 1
    assert [k.n_bucket for k, _ in configs.entries(user)] == [2048]
    assert look(2048)["C"] == 32


def test_stale_triton_warns_once_and_is_ignored(store):
    configs.record(key(1024, triton="3.5"), params(64), 1.0, 3)
    with pytest.warns(ConfigStoreWarning, match=r"Triton 3\.5.*stale"):
        assert look(1024, triton="3.6") is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert look(1024, triton="3.6.1") is None
    assert not [w for w in caught if issubclass(w.category, ConfigStoreWarning)]
    assert look(1024, triton="3.5.2")["C"] == 64   # the matching version still hits


def _writer(directory, worker, count, start):
    start.wait()
    for i in range(count):
        ok = configs.record(key(1 << (i % 8 + 6), variant=f"w{worker}-{i // 8}"),
                            params(i), float(i + 1), 1, directory=directory)
        assert ok


def test_concurrent_writers_keep_all_entries(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers, count = 3, 40
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, count, start))
             for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    doc = json.loads((tmp_path / "sm90.json").read_text())
    assert len(doc["entries"]) == workers * count
    assert len(configs.entries(tmp_path)) == workers * count


def test_mtime_cache_no_reads_when_unchanged_and_sees_external_change(store, monkeypatch):
    user, _ = store
    configs.record(key(), params(32), 1.0, 3)
    assert look(1024)["C"] == 32

    def no_read(path):
        raise AssertionError(f"{path} re-read although unchanged")
    monkeypatch.setattr(configs, "_read_bytes", no_read)
    assert look(1024)["C"] == 32                  # served from the cache after one stat
    monkeypatch.undo()
    monkeypatch.setenv("LIGHTGEN_TUNED_DIR", str(user))
    monkeypatch.setattr(configs, "shipped_dir", lambda: user.parent / "shipped")

    # an in-place edit of the same size; force a distinct mtime so coarse clocks can't hide it
    path = user / "sm90.json"
    st = path.stat()
    text = path.read_text()
    assert '"C": 32' in text
    with open(path, "w") as f:
        f.write(text.replace('"C": 32', '"C": 48'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert look(1024)["C"] == 48

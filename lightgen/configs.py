"""Tuned-config store: launch parameters found by the tuner, one JSON file per GPU arch.

A key (ConfigKey) names one launch situation: GPU arch and device name, Triton major.minor,
the hash of the kernel's generated code (field `variant`: render.kernel_key), kernel ("fwd",
"bwd_dq", ...), head dims dk/dv, dtype, and the sequence length rounded up to a power of two
(n_bucket). Its value is

    {"params": {"C": 64, "BV": 64, "num_warps": 4, ...}, "ms": 0.41, "date": "2025-01-31", "trials": 60}

Files live at <dir>/<arch>.json (e.g. sm90.json) and look like
{"format": 1, "entries": [{"key": {...}, "value": {...}}, ...]}, sorted by key with indent=1
so that git diffs of committed results stay readable.

Two stores are read:
  - shipped, read-only: tuned_configs/ inside the installed package, or at the repo root in a
    source checkout;
  - user, writable: $LIGHTGEN_TUNED_DIR, else $XDG_CACHE_HOME/lightgen/tuned_configs
    (~/.cache/lightgen/tuned_configs).
lookup() merges them (user wins on the same key) and picks the nearest n bucket; a GPU without
entries of its own borrows another GPU's of the same arch. It runs on
every kernel launch, so parsed files are cached in-process and revalidated with one stat.

Robustness: a damaged file or entry warns (ConfigStoreWarning, naming the file) and is skipped;
nothing on the lookup path raises. Writes take a file lock (<file>.lock) and replace the file
atomically. A corrupt file is moved aside to <name>.corrupt-<timestamp> before being replaced,
and single entries we cannot parse are carried along verbatim on rewrite, so no data is lost.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date
from pathlib import Path
from typing import Iterable

from filelock import FileLock

FORMAT = 1


class ConfigStoreWarning(UserWarning):
    """A store file or entry was unreadable, stale, or moved aside."""


def _warn(msg: str) -> None:
    warnings.warn(msg, ConfigStoreWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# keys and values

def n_bucket(n: int) -> int:
    """Sequence length rounded up to a power of two (at least 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _major_minor(version: str) -> str:
    """'3.6.0', '3.6.0+gitabc', '3.6' -> '3.6'."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return f"{m[1]}.{m[2]}"


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float32": "fp32", "float": "fp32"}


@functools.lru_cache(maxsize=64)
def dtype_name(dtype) -> str:
    """Short dtype name used in keys: torch.bfloat16 / 'bfloat16' / 'bf16' -> 'bf16'."""
    s = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(s, s)


DTYPE_NAMES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    """The torch dtype of a short name: 'bf16' -> torch.bfloat16."""
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(name)]


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    """Installed Triton as 'major.minor' (the granularity at which tuned configs stay valid)."""
    import triton
    return _major_minor(triton.__version__)


def current_arch(device=None) -> tuple[str, str]:
    """("sm90", "NVIDIA H100 80GB HBM3") for a CUDA device; ("cpu", "cpu") without CUDA."""
    try:
        import torch
    except ImportError:
        return ("cpu", "cpu")
    if not torch.cuda.is_available():
        return ("cpu", "cpu")
    if device is None:
        index = torch.cuda.current_device()
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            return ("cpu", "cpu")
        index = torch.cuda.current_device() if dev.index is None else dev.index
    return _cuda_arch(index)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> tuple[str, str]:
    import torch
    major, minor = torch.cuda.get_device_capability(index)
    return (f"sm{major}{minor}", torch.cuda.get_device_name(index))


# arch becomes a file name: keep it to a safe character set (no '/', no '..' tricks via import)
_ARCH_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, order=True)
class ConfigKey:
    arch: str
    gpu: str
    triton: str
    variant: str
    kernel: str
    dk: int
    dv: int
    dtype: str
    n_bucket: int

    def __post_init__(self):
        for name in ("arch", "gpu", "triton", "variant", "kernel", "dtype"):
            v = getattr(self, name)
            if name == "dtype" and (isinstance(v, str) or type(v).__name__ == "dtype"):
                v = dtype_name(v)  # accept torch.bfloat16 / "bfloat16" as well as "bf16"
                object.__setattr__(self, name, v)
            if not isinstance(v, str) or not v:
                raise ValueError(f"ConfigKey.{name} must be a non-empty string, got {v!r}")
        if not _ARCH_RE.match(self.arch):
            raise ValueError(f"ConfigKey.arch {self.arch!r} is not a plain name like 'sm90'")
        object.__setattr__(self, "triton", _major_minor(self.triton))
        for name in ("dk", "dv", "n_bucket"):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:  # type() check: bool is an int subclass
                raise ValueError(f"ConfigKey.{name} must be a positive int, got {v!r}")
        if self.n_bucket & (self.n_bucket - 1):
            raise ValueError(f"ConfigKey.n_bucket must be a power of two, got {self.n_bucket}")

    def group(self) -> tuple:
        """Everything but n_bucket: lookup picks the nearest bucket within one group."""
        return (self.arch, self.gpu, self.triton, self.variant, self.kernel,
                self.dk, self.dv, self.dtype)


_KEY_FIELDS = frozenset(f.name for f in fields(ConfigKey))


def _check_value(v) -> dict:
    """Validate a value dict; return a normalised copy (params sorted, extra fields kept)."""
    if not isinstance(v, dict):
        raise TypeError("value must be an object")
    params, ms, day, trials = v["params"], v["ms"], v["date"], v["trials"]
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise TypeError("params must be an object with string keys")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0:
        raise ValueError(f"ms must be a finite non-negative number, got {ms!r}")
    if not isinstance(day, str):
        raise TypeError("date must be a string")
    if type(trials) is not int or trials < 0:
        raise ValueError(f"trials must be a non-negative int, got {trials!r}")
    extra = {k: v[k] for k in sorted(v) if k not in ("params", "ms", "date", "trials")}
    return {"params": dict(sorted(params.items())), "ms": float(ms), "date": day,
            "trials": trials, **extra}


def _parse_entry(raw) -> tuple[ConfigKey, dict]:
    if not isinstance(raw, dict):
        raise TypeError("entry must be an object")
    k = raw["key"]
    if not isinstance(k, dict) or set(k) != _KEY_FIELDS:
        raise ValueError("key fields do not match ConfigKey")
    return ConfigKey(**k), _check_value(raw["value"])


# ---------------------------------------------------------------------------------------------
# reading files (with the in-process cache)

@dataclass
class _FileData:
    ok: bool = True                                   # False: whole file unreadable / wrong format
    entries: dict = field(default_factory=dict)       # ConfigKey -> value
    bad: list = field(default_factory=list)           # raw entries we could not parse, kept verbatim
    groups: dict = field(default_factory=dict)        # key.group() -> {n_bucket: {"params", "ms", ...}}
    tritons: dict = field(default_factory=dict)       # group minus triton -> {triton versions}
    siblings: dict = field(default_factory=dict)      # group minus gpu -> {gpu: {n_bucket: value}}


def _parse(path: Path, blob: bytes) -> _FileData:
    try:
        doc = json.loads(blob)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        _warn(f"tuned-config file {path} is not valid JSON ({e}); ignoring it")
        return _FileData(ok=False)
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT
            and isinstance(doc.get("entries"), list)):
        _warn(f"tuned-config file {path} is not a format-{FORMAT} store "
              f"({{'format': {FORMAT}, 'entries': [...]}}); ignoring it")
        return _FileData(ok=False)
    data = _FileData()
    for raw in doc["entries"]:
        try:
            key, value = _parse_entry(raw)
        except (KeyError, TypeError, ValueError):
            data.bad.append(raw)
            continue
        old = data.entries.get(key)
        if old is None or value["ms"] < old["ms"]:  # duplicate keys (hand edits): faster wins
            data.entries[key] = value
    if data.bad:
        _warn(f"tuned-config file {path}: skipped {len(data.bad)} unreadable entr"
              f"{'y' if len(data.bad) == 1 else 'ies'} (kept in the file untouched)")
    for key, value in data.entries.items():
        data.groups.setdefault(key.group(), {})[key.n_bucket] = value
        g = key.group()
        data.tritons.setdefault(g[:2] + g[3:], set()).add(key.triton)
        data.siblings.setdefault(g[:1] + g[2:], {}).setdefault(key.gpu, {})[key.n_bucket] = value
    return data


# path -> ((mtime_ns, size, inode), _FileData). The inode catches os.replace even when the
# new file has the same size and the filesystem's mtime granularity hides the change.
_cache: dict[str, tuple[tuple, _FileData]] = {}


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _load(path) -> _FileData | None:
    """Parsed contents of a store file, or None if it does not exist. Cheap when unchanged."""
    p = str(path)
    try:
        st = os.stat(p)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _cache.get(p)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        blob = _read_bytes(Path(p))
    except OSError as e:
        _warn(f"tuned-config file {path} could not be read ({e}); ignoring it")
        return _FileData(ok=False)  # not cached: a transient error should be retried
    data = _parse(path, blob)
    _cache[p] = (stamp, data)
    return data


# ---------------------------------------------------------------------------------------------
# store locations

@functools.lru_cache(maxsize=None)
def shipped_dir() -> Path:
    """Read-only defaults: inside the wheel, else the repo root of a source checkout."""
    here = Path(__file__).resolve().parent
    inside = here / "tuned_configs"
    return inside if inside.is_dir() else here.parent / "tuned_configs"


def user_dir() -> Path:
    """Writable store: $LIGHTGEN_TUNED_DIR, else the XDG cache dir. Read on every call so
    changing the environment (tests, CLI flags) takes effect immediately."""
    env = os.environ.get("LIGHTGEN_TUNED_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightgen" / "tuned_configs"


def _store_file(directory, arch: str) -> Path:
    return Path(directory if directory is not None else user_dir()) / f"{arch}.json"


# ---------------------------------------------------------------------------------------------
# lookup

_warned_stale: set[str] = set()


@functools.lru_cache(maxsize=256)
def _lookup_files(shipped: Path, env_dir, xdg, arch: str) -> tuple[str, str]:
    """(shipped file, user file) for an arch, user last so its entries win. Memoised on the
    environment it depends on: building Paths costs more than the stat on the hot path."""
    return (os.path.join(shipped, f"{arch}.json"), os.path.join(user_dir(), f"{arch}.json"))


def lookup(arch, gpu, triton, variant, kernel, dk, dv, dtype, n) -> dict | None:
    """Launch params for the nearest n bucket with all other key fields equal, or None.

    Nearest is by log2 distance between buckets; ties go to the larger bucket (a config tuned
    for longer sequences is the safer guess: more parallelism to hide). User entries override
    shipped ones on the same key. Entries for another Triton major.minor are ignored.
    With no entry for this GPU, another GPU's of the same arch serve (warned once): GPUs of one arch
    share the SM design (registers, shared memory), so its configs launch, and they are a better guess
    than the heuristic (an H200 runs the H100's sm90 entries). This GPU's own entries always win.
    """
    entry = lookup_entry(arch, gpu, triton, variant, kernel, dk, dv, dtype, n)
    return None if entry is None else dict(entry["params"])  # a copy: callers must not mutate the cache


def lookup_entry(arch, gpu, triton, variant, kernel, dk, dv, dtype, n) -> dict | None:
    """lookup's whole entry: {"params", "ms" (the tuned time), "trials", ...}; do not mutate it."""
    triton = _major_minor(triton)
    dtype = dtype_name(dtype)
    group = (arch, gpu, triton, variant, kernel, dk, dv, dtype)
    buckets: dict[int, dict] = {}
    loaded = []
    for path in _lookup_files(shipped_dir(), os.environ.get("LIGHTGEN_TUNED_DIR"),
                              os.environ.get("XDG_CACHE_HOME"), arch):
        data = _load(path)
        if data is not None:
            buckets.update(data.groups.get(group, ()))
            loaded.append((path, data))
    if not buckets:
        buckets = _sibling_buckets(loaded, group)
    if not buckets:
        _warn_if_stale(loaded, group)
        return None
    want = n_bucket(n).bit_length()
    return buckets[min(buckets, key=lambda b: (abs(b.bit_length() - want), -b))]


_warned_sibling: set[tuple] = set()


def _sibling_buckets(loaded, group) -> dict:
    """The buckets of the same group tuned on another GPU of the same arch: the GPU with the most
    buckets (then the first name), warned once per (this GPU, that GPU, arch)."""
    by_gpu: dict[str, dict] = {}
    for _, data in loaded:
        for gpu, buckets in data.siblings.get(group[:1] + group[2:], {}).items():
            by_gpu.setdefault(gpu, {}).update(buckets)
    by_gpu.pop(group[1], None)
    if not by_gpu:
        return {}
    gpu = min(by_gpu, key=lambda g: (-len(by_gpu[g]), g))
    said = (group[1], gpu, group[0])
    if said not in _warned_sibling:
        _warned_sibling.add(said)
        _warn(f"no tuned launch configs for {group[1]}; using those tuned on {gpu} (the same arch, "
              f"{group[0]}). Tune this GPU for its own: lightgen tune SPEC")
    return by_gpu[gpu]


def _warn_if_stale(loaded, group) -> None:
    """On a miss, say (once per file) if entries exist that differ only in Triton version."""
    triton, rest = group[2], group[:2] + group[3:]
    for path, data in loaded:
        other = data.tritons.get(rest, set()) - {triton}
        if other and str(path) not in _warned_stale:
            _warned_stale.add(str(path))
            _warn(f"tuned-config file {path} has entries for Triton {', '.join(sorted(other))} "
                  f"but Triton {triton} is installed; they are stale and ignored (re-tune)")


# ---------------------------------------------------------------------------------------------
# writing

def _write(path: Path, entries: dict, bad: list) -> None:
    """Atomic write: temp file in the same directory, fsync, os.replace."""
    doc = {"format": FORMAT,
           "entries": [{"key": asdict(k), "value": v} for k, v in sorted(entries.items())] + bad}
    text = json.dumps(doc, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; store files are meant to be shared/committed
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _move_aside(path: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    i = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{i}")
        i += 1
    os.replace(path, dest)
    _warn(f"tuned-config file {path} was corrupt; moved it aside to {dest} before writing")


def _update(path: Path, new: Iterable[tuple[ConfigKey, dict]]) -> int:
    """Merge entries into one store file under its lock, faster wins. Returns how many were
    added or improved (the file is rewritten only if that is > 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = _load(path)  # stat under the lock sees the latest writer's file
        if data is not None and not data.ok:
            _move_aside(path)
            data = None
        entries = dict(data.entries) if data else {}  # copy: never mutate the cached object
        bad = list(data.bad) if data else []
        changed = 0
        for key, value in new:
            old = entries.get(key)
            if old is None or value["ms"] < old["ms"]:
                entries[key] = value
                changed += 1
        if changed:
            _write(path, entries, bad)
        return changed


def rekey(path, variants: dict[tuple[str, str], str]) -> int:
    """Move the entries of one store file to new variant hashes, under its lock: `variants` maps
    (variant, kernel) to the new variant field (where kernels' code is keyed differently than when
    they were tuned). On a clash the faster entry stays; unreadable entries are carried along.
    Returns how many entries moved."""
    path = Path(path)
    with FileLock(str(path) + ".lock"):
        data = _load_source(path)
        entries, moved = {}, 0
        for key, value in sorted(data.entries.items(), key=lambda kv: kv[1]["ms"], reverse=True):
            new = variants.get((key.variant, key.kernel))
            if new is not None:
                key, moved = replace(key, variant=new), moved + 1
            entries[key] = value  # (slowest first: the faster of a clash is written last)
        if moved:
            _write(path, entries, list(data.bad))
        return moved


def record(key: ConfigKey, params: dict, ms: float, trials: int, directory=None) -> bool:
    """Store a tuned result (user store unless `directory` is given). Keeps the faster entry if
    the key exists; returns True if this result was written."""
    value = _check_value({"params": dict(params), "ms": float(ms),
                          "date": date.today().isoformat(), "trials": trials})
    return _update(_store_file(directory, key.arch), [(key, value)]) > 0


# ---------------------------------------------------------------------------------------------
# listing, export / import / merge

def entries(directory=None) -> list[tuple[ConfigKey, dict]]:
    """All valid entries, sorted by key. Without `directory`: what lookup sees (shipped and
    user stores merged, user wins), stale Triton versions included."""
    dirs = [Path(directory)] if directory is not None else [shipped_dir(), user_dir()]
    merged: dict[ConfigKey, dict] = {}
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            data = _load(path)
            if data is not None:
                merged.update(data.entries)
    return [(k, {**v, "params": dict(v["params"])}) for k, v in sorted(merged.items())]


def export_entries(path, directory=None) -> int:
    """Write entries(directory) to one store-format file at `path`; returns the count."""
    items = dict(entries(directory))
    _write(Path(path), items, [])
    return len(items)


def _load_source(path) -> _FileData:
    data = _load(Path(path))
    if data is None:
        raise FileNotFoundError(f"no such tuned-config file: {path}")
    return data


def import_entries(path, directory=None) -> int:
    """Merge an exported file into a store (user store unless `directory`), faster per key.
    Returns how many entries were added or improved. A corrupt source warns and imports 0."""
    by_arch = defaultdict(list)
    for key, value in _load_source(path).entries.items():
        by_arch[key.arch].append((key, value))
    return sum(_update(_store_file(directory, arch), items)
               for arch, items in sorted(by_arch.items()))


def merge_files(a, b, out) -> int:
    """Merge two store/exported files into `out` (faster per key; on equal time `a` wins).
    Unreadable single entries of either input are carried over verbatim. Returns the number
    of valid entries written."""
    merged: dict[ConfigKey, dict] = {}
    bad: list = []
    for src in (a, b):
        data = _load_source(src)
        for key, value in data.entries.items():
            old = merged.get(key)
            if old is None or value["ms"] < old["ms"]:
                merged[key] = value
        bad += [raw for raw in data.bad if raw not in bad]
    _write(Path(out), merged, bad)
    return len(merged)

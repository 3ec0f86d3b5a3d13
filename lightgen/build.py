"""Generated kernel files: write once per source key into the cache folder, import from there.

Triton needs @triton.jit functions to live in real .py files, so each variant's rendered module is
written to  <cache>/<slug>_<key>.py  where key hashes the rendered source itself (variant, templates
and lightgen's version all shape it; see render.source_key). The first line holds a checksum of the rest, so a
truncated or edited file is re-rendered rather than imported.

Cache folder: $LIGHTGEN_CACHE_DIR, else $XDG_CACHE_HOME/lightgen/kernels, else ~/.cache/lightgen/kernels.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType

from .render import render, source_key
from .spec import Variant

_loaded: dict[tuple, ModuleType] = {}  # (variant, module, interpreted) -> module
_lock = threading.Lock()


def cache_dir() -> Path:
    if os.environ.get("LIGHTGEN_CACHE_DIR"):
        return Path(os.environ["LIGHTGEN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightgen" / "kernels"


def kernel_path(variant: Variant, module: str = "main") -> Path:
    """<slug>[_<module>]_<key>.py (render.MODULES: the main module has no suffix)."""
    suffix = "" if module == "main" else f"_{module}"
    return cache_dir() / f"{variant.slug}{suffix}_{source_key(variant, module=module)}.py"


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _is_intact(path: Path) -> bool:
    try:
        first, _, body = path.read_text().partition("\n")
    except (OSError, UnicodeDecodeError):
        return False
    return first == f"# lightgen-checksum: {_checksum(body)}"


def _write(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # write to a temp file and rename: readers in other processes never see half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(f"# lightgen-checksum: {_checksum(body)}\n{body}")
    os.replace(tmp, path)


def ensure_source(variant: Variant, module: str = "main") -> Path:
    """The generated file of one of the variant's modules (render.MODULES), rendered only if missing
    or damaged."""
    path = kernel_path(variant, module)
    if not _is_intact(path):
        if path.exists():
            warnings.warn(f"lightgen: generated file {path} is damaged (checksum mismatch); regenerating", stacklevel=3)
        _write(path, render(variant, module=module))
    return path


def load(variant: Variant, module: str = "main") -> ModuleType:
    """Import the variant's kernel module, once per process: this runs on every kernel call, so it
    is one dict lookup (hashing the rendered source, as the file name needs, costs ~0.3 ms). The
    templates are read when a variant is first loaded; a template edit takes effect in a new process."""
    # @triton.jit decides at import whether a function is compiled or interpreted: one module per mode
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    loaded = _loaded.get((variant, module, interpreted))
    if loaded is not None:
        return loaded
    with _lock:
        key = source_key(variant, module=module) + ("_interpreted" if interpreted else "")
        if (variant, module, interpreted) not in _loaded:
            path = ensure_source(variant, module)
            name = f"lightgen_kernels_{key}"
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded  # Triton reads the source of jitted functions via their module
            spec.loader.exec_module(loaded)
            _loaded[(variant, module, interpreted)] = loaded
        return _loaded[(variant, module, interpreted)]

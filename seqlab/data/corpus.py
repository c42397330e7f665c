"""Find the documents of a text corpus: files, folders, glob patterns, or the built-in ``stdlib`` corpus.

``find_documents(spec)`` -> ``Corpus(name, root, paths)``; one file is one document. ``spec`` is

    "stdlib"                  the .py sources of this Python's standard library (``sysconfig`` "stdlib" path),
                              without site-packages, tests and test data: tens of MB of real text, offline
    "notes.txt"               one file
    "docs/"                   every regular file under a folder (hidden files and folders skipped)
    "data/**/*.md"            a glob pattern (recursive with **)
    "a.txt,docs/"             several of the above, comma-separated

Paths are sorted, so the document order (and everything derived from it) is the same on every run.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from seqlab.errors import ConfigError

STDLIB = "stdlib"
# stdlib folders that are not the library itself: installed packages, test suites and their data
_STDLIB_SKIP = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
})  # fmt: skip
_BINARY_SUFFIXES = frozenset({".pyc", ".pyo", ".so", ".dll", ".dylib", ".o", ".a", ".zip", ".gz", ".png", ".jpg"})


@dataclass(frozen=True)
class Corpus:
    """A list of document files. ``root`` is the folder names are taken relative to (for the split hash)."""

    name: str
    root: Path
    paths: tuple[Path, ...]

    def names(self) -> list[str]:
        """Document names relative to ``root`` (stable across machines; the train/validation split hashes them)."""
        return [_relative(p, self.root) for p in self.paths]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def fingerprint(self) -> str:
        """Changes whenever a document is added, removed or modified (name, size and modification time)."""
        digest = hashlib.sha256(self.name.encode())
        for path, name in zip(self.paths, self.names()):
            stat = path.stat()
            digest.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus() -> Corpus:
    """The standard library's .py files, skipping site-packages, test suites and lib2to3's fixtures."""
    root = stdlib_root()
    if not root.is_dir():
        raise ConfigError(f"--data stdlib: this Python's standard library folder {str(root)!r} does not exist")
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and not d.startswith("."))
        paths.extend(Path(folder) / f for f in files if f.endswith(".py") and not f.startswith("test_"))
    return _checked(Corpus(STDLIB, root, tuple(sorted(paths))), STDLIB)


def find_documents(spec: str | os.PathLike) -> Corpus:
    """The corpus named by ``spec`` (see the module docstring); a missing path or no documents raise ConfigError."""
    spec = str(spec)
    if spec.strip() == STDLIB:
        return stdlib_corpus()
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"--data: expected a file, folder, glob or 'stdlib', got {spec!r}")
    found: set[Path] = set()
    for part in parts:
        found.update(_expand(part))
    paths = tuple(sorted(found))
    root = _common_root(paths) if paths else Path(parts[0])
    return _checked(Corpus(spec, root, paths), spec)


def absolute_spec(spec: str | os.PathLike) -> str:
    """``spec`` with each relative path or pattern made absolute (from the working directory), so that a run
    stored with it resumes from anywhere; 'stdlib' stays as it is."""
    spec = str(spec)
    if spec.strip() == STDLIB:
        return spec
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    return ",".join(os.path.abspath(os.path.expanduser(part)) for part in parts)


def _expand(part: str) -> list[Path]:
    if any(ch in part for ch in "*?["):
        matches = [Path(p) for p in glob.glob(os.path.expanduser(part), recursive=True)]
        if not matches:
            raise ConfigError(f"--data: the pattern {part!r} matches no files")
        return [p.resolve() for p in matches if p.is_file() and p.suffix not in _BINARY_SUFFIXES]
    path = Path(os.path.expanduser(part))
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        files = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            keep = [n for n in names if not n.startswith(".") and Path(n).suffix not in _BINARY_SUFFIXES]
            files.extend(Path(folder) / n for n in keep)
        return [p.resolve() for p in files]
    raise ConfigError(f"--data: {part!r} does not exist (expected a file, a folder, a glob pattern or 'stdlib')")


def _checked(corpus: Corpus, spec: str) -> Corpus:
    if not corpus.paths:
        raise ConfigError(f"--data: {spec!r} holds no documents (no files found)")
    if corpus.total_bytes() == 0:
        raise ConfigError(f"--data: {spec!r} is empty (its {len(corpus.paths)} file(s) hold no bytes)")
    return corpus


def _common_root(paths: tuple[Path, ...]) -> Path:
    root = Path(os.path.commonpath([str(p) for p in paths]))
    return root.parent if root.is_file() else root


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()

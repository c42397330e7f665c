"""Files that never end up half-written: every save goes to a temporary sibling and is renamed into place.

``atomic_dir(path)`` yields a temporary directory next to ``path``; when the block ends without error it replaces
``path`` in one rename (the previous version is removed only after the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqlab.errors import CheckpointError


def _read_umask() -> int:
    """The process umask (read once, at import: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _default_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the finished file or directory the mode a plain open() or
    mkdir() would (0666/0777 less the umask), so results and checkpoints stay readable like the rest of the run."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temp dir; on success it becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _default_mode(tmp, directory=True)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Make the complete directory ``tmp`` become ``path``; a previous ``path`` is removed only afterwards."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> bool:
    """Put back the previous version of ``path`` if a crash fell between ``replace_dir``'s two renames (``path``
    gone, its complete predecessor left as ``.NAME.old-PID``); True if one was put back. Half-written
    ``.NAME.tmp-*`` siblings are never taken: nothing marks them complete."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    previous = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    previous = [p for p in previous if p.is_dir()]
    if not previous:
        return False
    os.replace(previous[-1], path)
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what}: {str(path)!r} is not valid JSON ({err}); the file may be truncated") from err


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written through a temp file, synced and renamed (tensors made contiguous, shared storage
    split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:  # on disk before the rename makes it the file (as atomic_write_text)
            os.fsync(handle.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path, what: str = "weights", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or damaged file into a CheckpointError that says which."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {str(path)!r} does not exist")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what}: {str(path)!r} could not be read ({err}); the file may be truncated") from err

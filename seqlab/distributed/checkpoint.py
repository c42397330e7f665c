"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the
model and optimizer state; loading reshards to the current world size (a checkpoint written by 2 ranks loads in 1
process, or in 4), because DCP stores each tensor's global layout.

Layout of a checkpoint directory written in a distributed run::

    dcp/                              DCP files: .metadata + one __<rank>_0.distcp per rank (model + optimizer)
    model.safetensors, config.json    the full model, gathered to rank 0 (``LanguageModel.load`` reads it as is)
    ...                               whatever the caller writes on rank 0 (trainer.json, RNG states)

Tensor-parallel mixer shards (Mamba-2, Mamba, S4: modules with ``full_tensors`` / ``local_tensors``) hold slices in
a layout of their own (e.g. [x_0, z_0, x_1, z_1] rows of a Mamba ``in_proj``); their model state is gathered to the
original layout by their ``state_dict`` hooks, and their optimizer state is converted here the same way before
saving (and sliced back after loading), so a checkpoint written at ``--tp 2`` holds the unsharded layout and
resumes at ``--tp 1`` (one process, or data parallel) or ``--tp 4``, and the reverse.

The directory is first written under a temporary sibling and renamed into place by rank 0 once every rank has
finished, so a crash never leaves a half-written checkpoint in place of a good one. Multi-node runs need the
directory on a filesystem every node sees.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from seqlab.errors import CheckpointError
from seqlab.io import replace_dir

DCP_DIR = "dcp"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a DCP checkpoint (written by ``save_sharded``)."""
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU, on rank 0 (other ranks get {}); a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 write_rank0: Callable[[Path], None] | None = None) -> Path:
    """Write model + optimizer shards (every rank calls this), the full model (rank 0) and the caller's files
    (``write_rank0(tmp_dir)`` on rank 0) into ``path``, replacing it atomically. ``model`` is the unwrapped model
    (DDP's ``.module``, or the FSDP2-sharded model itself)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-sharded")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_to_full_layout(model, optim_state)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
    full = full_model_state(model)
    if _rank() == 0:
        try:
            _write_full_model(model, full, tmp)
            if write_rank0 is not None:
                write_rank0(tmp)
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _barrier()
    return path


def _write_full_model(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """config.json + model.safetensors in the layout ``seqlab.models.checkpoint`` reads (tied head stored once)."""
    from seqlab.io import save_tensors

    config = getattr(model, "config", None)
    tensors = dict(state)
    if config is not None and getattr(config, "tie_embeddings", False):
        tensors.pop("lm_head.weight", None)
    if config is not None and hasattr(config, "to_json"):
        import seqlab
        from seqlab.models.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE

        (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
        meta = {"format": FORMAT, "seqlab_version": seqlab.__version__}
        save_tensors(directory / WEIGHTS_FILE, tensors, metadata=meta)
    else:
        save_tensors(directory / "model.safetensors", tensors)


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a ``save_sharded`` checkpoint into ``model`` (and ``optimizer``) at any world size, including a plain
    single process without a process group; every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"checkpoint: {str(path / DCP_DIR)!r} holds no sharded checkpoint (.metadata missing)")
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        _dcp_load(dcp, state, path)
        set_model_state_dict(model, state["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    local_groups = [list(g["params"]) for g in optim_state["param_groups"]]
    optim_to_full_layout(model, optim_state)
    state = {"model": model_state, "optim": optim_state}
    _dcp_load(dcp, state, path)
    optim_to_local_layout(model, state["optim"], local_groups)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# DCP's FileSystemReader unpickles ``.metadata`` and its DefaultLoadPlanner reads non-tensor entries (optimizer
# param_groups) with ``torch.load(weights_only=False)``: both run arbitrary code from a crafted checkpoint. Read
# them through an allowlist instead (the classes DCP's own metadata is made of) and ``weights_only=True``.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any name: Metadata, TensorStorageMetadata, ...
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _METADATA_GLOBALS.get(module, ())
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's DCP metadata")


def _safe_reader(directory: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            locate = getattr(self, "_get_metadata_path", None)  # newer torch: per-rank metadata files
            path = locate(kwargs.get("rank")) if locate is not None else self.fs.concat_path(self.path, ".metadata")
            with self.fs.create_stream(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def _safe_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()


def _dcp_load(dcp, state: dict, path: Path) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=_safe_reader(str(path / DCP_DIR)), planner=_safe_planner())
    except (RuntimeError, ValueError, KeyError, AssertionError, OSError, EOFError, pickle.UnpicklingError,
            CheckpointException) as err:
        # CheckpointException: rank -> (exception, frames); its str() carries the tracebacks
        failures = [f[0] if isinstance(f, tuple) else f for f in (getattr(err, "failures", None) or {}).values()]
        cause = "; ".join(f"{type(e).__name__}: {e}" for e in failures) or str(err)
        raise CheckpointError(f"checkpoint: {str(path)!r} does not match the model or optimizer, or its dcp/ "
                              f"files are damaged ({cause})") from None


# ------------------------------------------------------------------- tensor-parallel optimizer layouts
def tp_shards(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(prefix "layers.0.mixer.", module) of every tensor-parallel shard that converts its own layout."""
    return [(f"{name}." if name else "", m) for name, m in model.named_modules()
            if hasattr(m, "full_tensors") and hasattr(m, "local_tensors")]


def _is_layout_tensor(value) -> bool:
    """Optimizer entries shaped like their parameter (AdamW moments), as opposed to scalars (the step)."""
    return isinstance(value, torch.Tensor) and value.ndim > 0


def optim_to_full_layout(model: nn.Module, optim_state: dict) -> None:
    """In place: each TP shard's optimizer entries (local names, local slices) -> unsharded tensors under the
    original parameter names; param_groups list the original names. A collective on every rank of the shards."""
    state = optim_state.get("state", {})
    renames: dict[str, str] = {}
    for prefix, module in tp_shards(model):
        names = sorted(n for n, _ in module.named_parameters() if prefix + n in state)
        if not names:
            continue
        entries = {n: state.pop(prefix + n) for n in names}
        keys = sorted({k for e in entries.values() for k, v in e.items() if _is_layout_tensor(v)})
        full: dict[str, dict] = {}
        for key in keys:
            for n, t in module.full_tensors({n: e[key] for n, e in entries.items() if key in e}).items():
                full.setdefault(n, {})[key] = t
        for n, e in entries.items():
            renames[prefix + n] = prefix + module.full_name(n)
            for k, v in e.items():
                if not _is_layout_tensor(v):
                    full.setdefault(module.full_name(n), {}).setdefault(k, v)
        for n, e in full.items():
            state[prefix + n] = e
    for group in optim_state.get("param_groups", []):
        group["params"] = list(dict.fromkeys(renames.get(name, name) for name in group["params"]))


def optim_to_local_layout(model: nn.Module, optim_state: dict, local_groups: list[list[str]]) -> None:
    """The inverse of ``optim_to_full_layout`` for this rank: slice the loaded unsharded entries into its shards
    and restore the param_groups' local names (``local_groups``, from before the conversion)."""
    state = optim_state.get("state", {})
    for prefix, module in tp_shards(model):
        local_names = [n for n, _ in module.named_parameters()]
        full_names = sorted({module.full_name(n) for n in local_names})
        entries = {n: state.pop(prefix + n) for n in full_names if prefix + n in state}
        if not entries:
            continue
        keys = sorted({k for e in entries.values() for k, v in e.items() if _is_layout_tensor(v)})
        local: dict[str, dict] = {}
        for key in keys:
            for n, t in module.local_tensors({n: e[key] for n, e in entries.items() if key in e}).items():
                local.setdefault(n, {})[key] = t
        for n in local_names:  # scalars, one copy per parameter (AdamW increments its step in place)
            for k, v in entries.get(module.full_name(n), {}).items():
                if not _is_layout_tensor(v):
                    local.setdefault(n, {}).setdefault(k, v.clone() if isinstance(v, torch.Tensor) else v)
        for n, e in local.items():
            state[prefix + n] = e
    for group, names in zip(optim_state.get("param_groups", []), local_groups):
        group["params"] = names

"""InferenceState: everything a LanguageModel remembers between calls, for a batch of rows.

    layers[i]  the MixerState of layer i (KV cache for attention, conv + SSM state for Mamba, ...)
    shared[j]  the KV cache of the j-th application of a shared block (Zamba), one per application
    offset     positions consumed so far (the same for every row)

``save(path)`` writes one safetensors file; metadata records the offset, the batch size, the capacity
(max_seqlen) and a fingerprint of the model config, so ``load(path, model)`` refuses a file from another
model. Tensors whose size depends on the capacity (KV caches) are saved only up to the positions consumed,
so an SSM state file has the same size after 10 tokens or 10 million, and a KV cache file grows with the
conversation as the cache does. Complex tensors (S4D states) are stored as real views (..., 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from seqlab.errors import CheckpointError
from seqlab.io import save_tensors
from seqlab.mixers.base import MixerState

FORMAT = "seqlab.inference_state/1"


def config_fingerprint(config) -> str:
    """Short hash of the config JSON: two models share states only when their configs are identical."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


class InferenceState:
    """Per-layer MixerStates of one batch; built by ``LanguageModel.allocate_state``."""

    def __init__(
        self,
        layers: list[MixerState],
        shared: list[MixerState],
        batch: int,
        max_seqlen: int,
        fingerprint: str,
        seq_dims: dict[str, int] | None = None,
    ):
        self.layers = layers
        self.shared = shared
        self.batch = batch
        self.max_seqlen = max_seqlen
        self.fingerprint = fingerprint
        # tensor key -> the dimension whose size follows max_seqlen (KV caches); absent for fixed-size states
        self.seq_dims = dict(seq_dims or {})
        self.offset = 0

    # ------------------------------------------------------------------------------------------- access

    def named_states(self) -> list[tuple[str, MixerState]]:
        return [(f"layers.{i}", s) for i, s in enumerate(self.layers)] + [
            (f"shared.{j}", s) for j, s in enumerate(self.shared)
        ]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": t for prefix, s in self.named_states() for name, t in s.tensors.items()}

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(s.nbytes() for _, s in self.named_states())

    @property
    def grows_with_length(self) -> bool:
        """True when some tensor (a full-attention KV cache) is sized by max_seqlen."""
        return bool(self.seq_dims)

    def reset(self) -> None:
        """Forget everything: zero every tensor and rewind to offset 0 (reuse the memory for a new batch)."""
        for _, s in self.named_states():
            s.reset()
        self.offset = 0

    def __repr__(self) -> str:
        return (
            f"InferenceState(batch={self.batch}, offset={self.offset}, max_seqlen={self.max_seqlen}, "
            f"layers={len(self.layers)}, shared={len(self.shared)}, bytes={self.nbytes()})"
        )

    # --------------------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (atomically)."""
        tensors, complex_keys = {}, []
        for key, t in self.named_tensors().items():
            dim = self.seq_dims.get(key)
            if dim is not None:
                t = t.narrow(dim, 0, min(self.offset, t.shape[dim]))  # only the positions consumed so far
            if t.is_complex():
                t = torch.view_as_real(t)
                complex_keys.append(key)
            tensors[key] = t.detach().cpu()
        metadata = {
            "format": FORMAT,
            "offset": str(self.offset),
            "batch": str(self.batch),
            "max_seqlen": str(self.max_seqlen),
            "fingerprint": self.fingerprint,
            "offsets": json.dumps({prefix: s.offset for prefix, s in self.named_states()}),
            "complex": json.dumps(complex_keys),
        }
        save_tensors(path, tensors, metadata=metadata)

    @staticmethod
    def file_metadata(path: str | Path) -> dict[str, str]:
        """The metadata of a saved state (offset, batch, max_seqlen, fingerprint, ...) without loading tensors."""
        return _read(path, with_tensors=False)[0]

    @classmethod
    def load(cls, path: str | Path, model, max_seqlen: int | None = None, device=None) -> InferenceState:
        """Read a state saved by ``save`` into a fresh allocation of ``model``'s state.

        ``max_seqlen`` sets the capacity of the new allocation (default: the saved one); KV caches are copied
        into its first positions, so a conversation can be resumed with more room than it was saved with.
        """
        metadata, tensors = _read(path, with_tensors=True)
        if metadata.get("format") != FORMAT:
            raise CheckpointError(
                f"state: {str(path)!r} is not a seqlab inference state (format {metadata.get('format')!r})"
            )
        fingerprint = config_fingerprint(model.config)
        if metadata.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"state: {str(path)!r} was saved from a model with another config (fingerprint "
                f"{metadata.get('fingerprint')}, this model has {fingerprint}); load it into the model it came from"
            )
        offset, batch = int(metadata["offset"]), int(metadata["batch"])
        capacity = int(metadata["max_seqlen"]) if max_seqlen is None else max_seqlen
        state = model.allocate_state(batch, max(capacity, 1), device=device)
        state.offset = offset
        offsets = json.loads(metadata.get("offsets", "{}"))
        complex_keys = set(json.loads(metadata.get("complex", "[]")))

        expected = state.named_tensors()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"state: {str(path)!r} does not match the model: missing tensors {missing[:5]}, "
                f"unexpected tensors {unexpected[:5]}"
            )
        for key, target in expected.items():
            saved = tensors[key]
            if key in complex_keys:
                saved = torch.view_as_complex(saved.contiguous())
            if saved.shape == target.shape:
                target.copy_(saved)
                continue
            dim = state.seq_dims.get(key)
            fits = (
                dim is not None
                and saved.dim() == target.dim()
                and all(a == b for d, (a, b) in enumerate(zip(saved.shape, target.shape)) if d != dim)
                and saved.shape[dim] <= target.shape[dim]
            )
            if not fits:
                raise CheckpointError(
                    f"state: tensor {key!r} in {str(path)!r} has shape {tuple(saved.shape)}, the model's state has "
                    f"{tuple(target.shape)}; pass max_seqlen >= {offset} or load it into the model it came from"
                )
            target.narrow(dim, 0, saved.shape[dim]).copy_(saved)
        for prefix, s in state.named_states():
            s.offset = int(offsets.get(prefix, offset))
        return state


def _read(path: str | Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state: {str(path)!r} does not exist; pass a file written by InferenceState.save")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"state: {str(path)!r} could not be read ({err}); the file may be truncated") from err
    return metadata, tensors

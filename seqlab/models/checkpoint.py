"""Model checkpoints: a directory with ``config.json`` (ModelConfig) and ``model.safetensors`` (weights).

Written atomically (a half-written checkpoint never replaces a good one); read without pickle. A tied head is
stored once (as ``embedding.weight``). Every failure to read is a CheckpointError naming the file or tensor and
what to do about it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from seqlab.errors import CheckpointError, ConfigError
from seqlab.io import atomic_dir, load_tensors, save_tensors
from seqlab.models.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "seqlab.checkpoint/1"


def model_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict minus the tied head."""
    tensors = dict(model.state_dict())
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_model(model, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (replaced atomically)."""
    directory = Path(directory)
    import seqlab

    meta = {"format": FORMAT, "seqlab_version": seqlab.__version__, **(metadata or {})}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(model.config.to_json() + "\n")
        save_tensors(tmp / WEIGHTS_FILE, {k: v.cpu() for k, v in model_tensors(model).items()}, metadata=meta)
    return directory


def load_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint: {str(directory)!r} {what}; pass a directory written by model.save(dir) or `seqlab train`"
        )
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {str(path)!r} is missing; the directory is not a seqlab checkpoint")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"checkpoint: {str(path)!r} is not valid JSON ({err}); the file may be truncated"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint: {str(path)!r} must hold a JSON object")
    try:
        return ModelConfig.from_dict(data).validate()
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"checkpoint: {str(path)!r} holds an invalid config: {err}") from err


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model described by ``directory/config.json`` and restore its weights exactly."""
    from seqlab.models.language_model import LanguageModel

    directory = Path(directory)
    config = load_config(directory)
    weights_path = directory / WEIGHTS_FILE
    tensors = load_tensors(weights_path, what="checkpoint weights", device="cpu")
    with torch.device(device):
        model = LanguageModel(config)
    load_weights(model, tensors, source=str(weights_path))
    return model


def load_weights(model, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Copy ``tensors`` into ``model``; CheckpointError on any missing/unexpected key or shape mismatch."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint: {source!r} does not match the model built from config.json: "
            f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
            "the weights and config.json come from different models"
        )
    for name, target in expected.items():
        saved = tensors[name]
        if saved.shape != target.shape:
            raise CheckpointError(
                f"checkpoint: tensor {name!r} in {source!r} has shape {tuple(saved.shape)}, the model built from "
                f"config.json expects {tuple(target.shape)}; the weights and config.json come from different models"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])

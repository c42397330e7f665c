"""Read and write Hugging Face checkpoints (``config.json`` + safetensors) of the architectures seqlab can run.

    from_hf(directory, device="cpu") -> LanguageModel      # nothing downloads: a local directory only
    to_hf(model, directory, arch=None)                     # config.json + model.safetensors for transformers

A directory holds ``config.json`` and the weights as ``model.safetensors``, sharded safetensors
(``model.safetensors.index.json``), or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``, never
unpickling code). Weights are converted to float32 (seqlab keeps float32 parameters).

Each architecture has a module (``hf_mamba``, ``hf_mamba2``, ``hf_llama``, ``hf_jamba``, ``hf_bamba``,
``hf_recurrent_gemma``) with ``config_from_hf``, ``config_to_hf``, ``pairs`` (the explicit list of (seqlab,
transformers) weight names) and ``export_problems``; optional ``tensors_from_hf`` / ``tensors_to_hf`` convert
parametrisations that differ (RecurrentGemma's 1 + w norm weights). Anything in a config that seqlab cannot
represent raises ConfigError naming the field.

Vocabulary: imports keep transformers' vocabulary size exactly (``pad_vocab_to_multiple=1``); exports drop the rows
seqlab adds to pad the vocabulary, so transformers' logits equal seqlab's ``logits[..., :vocab_size]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch

from seqlab.errors import CheckpointError, ConfigError
from seqlab.interop import hf_bamba, hf_jamba, hf_llama, hf_mamba, hf_mamba2, hf_recurrent_gemma
from seqlab.interop.hf_common import HFConfig

FAMILIES: tuple[ModuleType, ...] = (hf_mamba, hf_mamba2, hf_llama, hf_jamba, hf_bamba, hf_recurrent_gemma)
ARCHITECTURES: dict[str, ModuleType] = {arch: family for family in FAMILIES for arch in family.ARCHITECTURES}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)
_MODEL_TYPES = {t: arch for family in FAMILIES for t, arch in family.MODEL_TYPES.items()}

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# tensors transformers checkpoints may carry that hold no weights of the model (recomputed buffers)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
# tokenizer files copied along by ``seqlab convert``
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ------------------------------------------------------------------------------------------------- import


def is_hf_checkpoint(directory: str | Path) -> bool:
    """True when ``directory/config.json`` is a transformers config (it names ``architectures`` or a
    ``model_type``), not a seqlab one."""
    path = Path(directory).expanduser() / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


def read_hf_config(directory: str | Path) -> HFConfig:
    """``directory/config.json`` with its architecture resolved; ConfigError for unsupported architectures."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"from_hf: directory {str(directory)!r} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"from_hf: {str(path)!r} is missing; pass a directory saved by transformers' save_pretrained "
            "(config.json + model.safetensors)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"from_hf: {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"from_hf: {str(path)!r} must hold a JSON object")
    archs = data.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch is None and not archs:
        arch = _MODEL_TYPES.get(data.get("model_type"))
    if arch not in ARCHITECTURES:
        given = archs or data.get("model_type")
        raise ConfigError(
            f"{path}: architectures: seqlab reads {list(SUPPORTED_ARCHITECTURES)}, got {given!r}"
        )
    return HFConfig(data, arch, source=str(path))


def config_from_hf(directory: str | Path):
    """The seqlab ModelConfig equivalent to ``directory/config.json`` (ConfigError naming any unsupported field)."""
    hf = read_hf_config(directory)
    return ARCHITECTURES[hf.architecture].config_from_hf(hf)


def from_hf(directory: str | Path, device: str | torch.device = "cpu"):
    """A seqlab LanguageModel with the weights of the transformers checkpoint in ``directory``."""
    from seqlab.models.checkpoint import load_weights
    from seqlab.models.language_model import LanguageModel

    directory = Path(directory).expanduser()
    hf = read_hf_config(directory)
    family = ARCHITECTURES[hf.architecture]
    config = family.config_from_hf(hf)
    hf_tensors = load_hf_tensors(directory)
    if hasattr(family, "unfuse_experts"):
        hf_tensors = family.unfuse_experts(hf_tensors)
    if hasattr(family, "tensors_from_hf"):  # parametrisations that differ (e.g. RecurrentGemma's 1 + w norms)
        hf_tensors = family.tensors_from_hf(hf_tensors)
    with torch.device(device):
        model = LanguageModel(config)
    tensors = _rename_to_seqlab(hf_tensors, family.pairs(config), model, hf)
    load_weights(model, tensors, source=str(directory))
    return model


def _rename_to_seqlab(hf_tensors: dict, pairs: list[tuple[str, str]], model, hf: HFConfig) -> dict:
    from seqlab.models.checkpoint import model_tensors

    expected = model_tensors(model)
    _check_pairs(pairs, expected)
    missing = [h for _, h in pairs if h not in hf_tensors]
    if missing:
        raise CheckpointError(
            f"from_hf: the weights lack {len(missing)} tensor(s) that {hf.architecture} with this config.json needs, "
            f"e.g. {missing[:4]}; the config and weights do not match (check use_conv_bias / use_bias / "
            "tie_word_embeddings)"
        )
    known = {h for _, h in pairs}
    if model.config.tie_embeddings:
        known.add("lm_head.weight")  # tied: transformers may store the head too; it is the embedding
    unexpected = sorted(h for h in hf_tensors if h not in known and not h.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(
            f"from_hf: the weights hold {len(unexpected)} tensor(s) seqlab's {hf.architecture} has no place for, "
            f"e.g. {unexpected[:4]}; a bias or module the config does not announce cannot be dropped silently"
        )
    out = {}
    for s, h in pairs:
        tensor, target = hf_tensors[h], expected[s]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"from_hf: tensor {h!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)} "
                f"(seqlab {s!r}); the config and weights do not match"
            )
        out[s] = tensor.to(torch.float32)
    return out


def _check_pairs(pairs: list[tuple[str, str]], expected: dict) -> None:
    """The name list must cover the model exactly (a converter bug otherwise, not a user error)."""
    names = [s for s, _ in pairs]
    if sorted(names) != sorted(expected):
        extra, absent = sorted(set(names) - set(expected)), sorted(set(expected) - set(names))
        raise RuntimeError(f"interop name map out of date: unknown {extra[:4]}, unmapped {absent[:4]}")


def load_hf_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``directory``: single or sharded safetensors, else pytorch_model.bin."""
    directory = Path(directory).expanduser()
    if (directory / SAFETENSORS_FILE).is_file():
        return _load_safetensors(directory / SAFETENSORS_FILE)
    if (directory / SAFETENSORS_INDEX).is_file():
        return _load_sharded(directory, SAFETENSORS_INDEX, _load_safetensors)
    if (directory / BIN_FILE).is_file():
        return _load_bin(directory / BIN_FILE)
    if (directory / BIN_INDEX).is_file():
        return _load_sharded(directory, BIN_INDEX, _load_bin)
    raise CheckpointError(
        f"from_hf: no weights in {str(directory)!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
        f"or {BIN_INDEX}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from seqlab.io import load_tensors

    return load_tensors(path, what="from_hf weights")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"from_hf: {str(path)!r} could not be read as plain tensors ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"from_hf: {str(path)!r} does not hold a flat dict of tensors")
    return data


def _load_sharded(directory: Path, index_name: str, load_one) -> dict[str, torch.Tensor]:
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"from_hf: {str(index_path)!r} has no valid weight_map ({err})") from err
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            raise CheckpointError(f"from_hf: shard {str(path)!r} listed in {index_name} is missing")
        tensors.update(load_one(path))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(f"from_hf: tensors {absent[:4]} listed in {index_name} are not in their shards")
    return tensors


# ------------------------------------------------------------------------------------------------- export


def infer_architecture(config) -> str:
    """The transformers architecture that holds a seqlab model of this config; ConfigError when none does."""
    kinds = set(config.layer_kinds())
    if config.shared_attention_every:
        raise ConfigError(
            "to_hf: shared_attention_every > 0 (Zamba) has no transformers counterpart seqlab writes; "
            f"supported architectures: {list(SUPPORTED_ARCHITECTURES)}"
        )
    if kinds == {"M"} and config.mlp == "none":
        return "FalconMambaForCausalLM" if config.bcdt_norm and not config.bcdt_norm_weight else "MambaForCausalLM"
    if kinds == {"M2"} and config.mlp == "none":
        return "Mamba2ForCausalLM"
    if kinds == {"A"} and config.mlp == "swiglu":
        return "LlamaForCausalLM"
    if kinds <= {"M", "A"} and config.mlp != "none":
        return "JambaForCausalLM"
    if kinds <= {"M2", "A"} and config.mlp == "swiglu":
        return "BambaForCausalLM"
    if kinds <= {"G", "A"} and config.lru_reset_input:
        return "RecurrentGemmaForCausalLM"
    raise ConfigError(
        f"to_hf: no supported transformers architecture holds pattern {' '.join(config.layer_kinds())!r} with "
        f"mlp={config.mlp!r}; supported architectures: {list(SUPPORTED_ARCHITECTURES)}"
    )


def config_to_hf(config, arch: str | None = None) -> dict:
    """The transformers ``config.json`` dict of a seqlab config; ConfigError listing every field that does not fit."""
    arch = infer_architecture(config) if arch is None else arch
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch: expected one of {list(SUPPORTED_ARCHITECTURES)}, got {arch!r}")
    family = ARCHITECTURES[arch]
    problems = family.export_problems(config, arch)
    if "S" in config.layer_kinds():
        problems.append("S4 layers ('S') have no transformers counterpart")
    if config.shared_attention_every:
        problems.append("shared_attention_every must be 0 (Zamba's shared block has no place in this architecture)")
    if problems:
        raise ConfigError(f"to_hf: this model cannot be written as {arch}: " + "; ".join(problems))
    out = {"architectures": [arch], **family.config_to_hf(config, arch)}
    out.update(dtype="float32", torch_dtype="float32", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return out


def to_hf(model, directory: str | Path, arch: str | None = None) -> Path:
    """Write ``model`` as a transformers checkpoint (``config.json`` + ``model.safetensors``, float32) into
    ``directory`` atomically; ``arch`` defaults to the architecture the config implies."""
    from seqlab.io import atomic_dir, save_tensors
    from seqlab.models.checkpoint import model_tensors

    config = model.config
    hf_config = config_to_hf(config, arch)
    family = ARCHITECTURES[hf_config["architectures"][0]]
    tensors = model_tensors(model)
    pairs = family.pairs(config)
    _check_pairs(pairs, tensors)
    out = {}
    for s, h in pairs:
        t = tensors[s].detach().to("cpu", torch.float32)
        if s in ("embedding.weight", "lm_head.weight"):
            t = t[: config.vocab_size]  # drop seqlab's padding rows
        out[h] = t
    if hasattr(family, "tensors_to_hf"):
        out = family.tensors_to_hf(out)
    directory = Path(directory).expanduser()
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_tensors(tmp / SAFETENSORS_FILE, out, metadata={"format": "pt"})
    return directory

"""seqlab: sequence models — attention, S4, Mamba, Mamba-2 and hybrids — built, trained, measured and run.

Light to import: the names below load their modules (and torch) on first use.

    import seqlab
    model = seqlab.from_preset("mamba", "tiny")
    ids = seqlab.generate(model, prompt_ids, max_new_tokens=20, temperature=0)
"""

from __future__ import annotations

from seqlab._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "generate": "seqlab.generation",
    "LanguageModel": "seqlab.models.language_model",
    "ModelConfig": "seqlab.models.config",
    "from_preset": "seqlab.models.presets",
    "preset_config": "seqlab.models.presets",
    "ByteTokenizer": "seqlab.tokenizer",
}

__all__ = ["__version__", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Language models: a stack of mixers given by a pattern, presets of the published families, state and files.

    from seqlab.models import LanguageModel, ModelConfig, from_preset, preset_config
"""

from __future__ import annotations

from seqlab._lazy import lazy_exports
from seqlab.models.config import ModelConfig

_EXPORTS = {
    "LanguageModel": "seqlab.models.language_model",
    "InferenceState": "seqlab.models.state",
    "PRESETS": "seqlab.models.presets",
    "SIZES": "seqlab.models.presets",
    "preset_config": "seqlab.models.presets",
    "from_preset": "seqlab.models.presets",
    "save_model": "seqlab.models.checkpoint",
    "load_model": "seqlab.models.checkpoint",
}

__all__ = ["ModelConfig", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)

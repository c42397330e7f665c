"""Interoperability with Hugging Face checkpoints and tokenizers (local directories only; nothing downloads).

    from_hf(directory, device="cpu") -> LanguageModel   MambaForCausalLM, FalconMambaForCausalLM, Mamba2ForCausalLM,
    to_hf(model, directory, arch=None)                   LlamaForCausalLM, JambaForCausalLM, BambaForCausalLM
    HFTokenizer(directory)                                tokenizer.json behind the ByteTokenizer interface

Reading checkpoints needs only torch and safetensors; ``HFTokenizer`` needs the ``tokenizers`` package.
"""

from __future__ import annotations

from seqlab.interop.hf import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf, from_hf, to_hf
from seqlab.interop.hf_tokenizer import HFTokenizer

__all__ = ["SUPPORTED_ARCHITECTURES", "HFTokenizer", "config_from_hf", "config_to_hf", "from_hf", "to_hf"]

"""Real text for language modelling: find documents (``corpus``), encode them once into cached memory-mapped
token streams (``tokenize``), and serve packed windows with document boundaries as a Task (``text_task``)."""

from seqlab.data.corpus import Corpus, find_documents, stdlib_corpus
from seqlab.data.text_task import TextData, evaluate_text
from seqlab.data.tokenize import TokenStream, default_cache_dir, encode_corpus, load_tokenizer

__all__ = [
    "Corpus", "TextData", "TokenStream", "default_cache_dir", "encode_corpus", "evaluate_text", "find_documents",
    "load_tokenizer", "stdlib_corpus",
]  # fmt: skip

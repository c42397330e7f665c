"""seqlab: sequence models — attention, S4, Mamba, Mamba-2 and hybrids — built, trained, measured and run."""

__version__ = "0.1.0"

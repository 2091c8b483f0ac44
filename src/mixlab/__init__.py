"""mixlab: language models on attention, Mamba, Mamba2, DeltaNet and Gated DeltaNet mixers."""

__version__ = "0.1.0"

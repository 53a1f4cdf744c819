"""The MiniCPM-style decoder and the probe interface the evaluator uses on its FFNs."""

from .minicpm import FFN, MiniCPM, padded_vocab_size
from .probe import ActivationRecorder, FFNTrace, MaskNeurons, Probe, ThresholdNeurons

__all__ = [
    "FFN", "MiniCPM", "padded_vocab_size",
    "Probe", "FFNTrace", "ActivationRecorder", "MaskNeurons", "ThresholdNeurons",
]

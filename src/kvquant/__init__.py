"""kvquant: KVQuant KV-cache quantization (Hooper et al., 2024) for unmodified Hugging Face transformers.

Data flows one way: model + text -> calibration statistics -> quantizer artifact -> cache / kernels -> reports.
"""

__version__ = "0.1.0"

from .cache import KVQuantCache  # noqa: E402
from .quantizer import Quantizer, QuantizerConfig, QuantizerError, load_quantizer  # noqa: E402

__all__ = ["KVQuantCache", "Quantizer", "QuantizerConfig", "QuantizerError", "load_quantizer", "__version__"]

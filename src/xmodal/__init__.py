"""xmodal: cross-modal attention for PyTorch -- text tokens attend to image features.

The public API. Each name lives in a small module of its own:

* :class:`CrossModalAttention`, :class:`ImageKV`, :func:`attend` -- ``xmodal.attention``
* :func:`normalize_attention_mask` -- ``xmodal.masks``
"""

from xmodal.attention import CrossModalAttention, ImageKV, attend
from xmodal.masks import normalize_attention_mask

__version__ = "0.1.0"

__all__ = [
    "CrossModalAttention",
    "ImageKV",
    "__version__",
    "attend",
    "normalize_attention_mask",
]

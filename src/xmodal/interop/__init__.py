"""Verified weight conversion from the cross-attention layers people already use.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``m`` media, ``h`` heads, ``d`` head
width.

One module per foreign format; each converter builds the xmodal module, maps every foreign
tensor to it, checks missing / unexpected keys and shapes, and only then loads (see
``docs/interop.md`` for the key tables, mask policies and known differences). Foreign packages
(``transformers``, ``flamingo_pytorch``) are imported only inside the converters that read their
modules; ``import xmodal.interop`` needs neither.

* ``torch.nn.MultiheadAttention``: :func:`from_torch_mha`, :func:`to_torch_mha`,
  :func:`keep_mask_from_torch_mha` -- ``xmodal.interop.torch_mha``
* flamingo-pytorch / OpenFlamingo: :func:`from_flamingo_pytorch`, :func:`load_open_flamingo`,
  :func:`flamingo_media_policy`, :class:`OpenFlamingoWeights` -- ``xmodal.interop.flamingo``
* HF Idefics: :func:`from_hf_idefics` -- ``xmodal.interop.idefics``
* HF Mllama (Llama 3.2 Vision): :func:`from_hf_mllama`, :func:`from_hf_mllama_model` --
  ``xmodal.interop.mllama``
* :class:`ConversionError` (a ``ValueError``) names every missing, unexpected and mis-shaped key.
"""

from xmodal.interop._load import ConversionError
from xmodal.interop.flamingo import (
    OpenFlamingoWeights,
    flamingo_media_policy,
    from_flamingo_pytorch,
    load_open_flamingo,
)
from xmodal.interop.idefics import from_hf_idefics
from xmodal.interop.mllama import from_hf_mllama, from_hf_mllama_model
from xmodal.interop.torch_mha import from_torch_mha, keep_mask_from_torch_mha, to_torch_mha

__all__ = [
    "ConversionError",
    "OpenFlamingoWeights",
    "flamingo_media_policy",
    "from_flamingo_pytorch",
    "from_hf_idefics",
    "from_hf_mllama",
    "from_hf_mllama_model",
    "from_torch_mha",
    "keep_mask_from_torch_mha",
    "load_open_flamingo",
    "to_torch_mha",
]

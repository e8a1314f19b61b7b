"""xmodal: cross-modal attention for PyTorch -- text tokens attend to image features.

The public API. Each name lives in a small module of its own:

* :class:`CrossModalAttention`, :class:`ImageKV`, :func:`attend` -- ``xmodal.attention``
* :func:`normalize_attention_mask`, :func:`media_attention_mask`, :func:`media_locations_from_ids`,
  :func:`visible_media_range`, ``MEDIA_POLICIES`` -- ``xmodal.masks``
* :class:`TanhGate` -- ``xmodal.gating``; :class:`FeedForward` -- ``xmodal.feedforward``
* :class:`GatedCrossAttentionBlock` -- ``xmodal.blocks``
* :class:`PerceiverResampler` -- ``xmodal.resampler``
* :func:`media_block_mask`, :func:`block_mask_from_keep_mask`, :func:`flex_attend`,
  :func:`sparse_cross_attention` -- ``xmodal.sparse`` (block-sparse media attention, flex)
* :func:`record_attention`, :class:`AttentionMaps`, :func:`fuse_heads`, :func:`compose`,
  :func:`rollout`, :func:`resampler_rollout` -- ``xmodal.attention_maps``;
  :func:`pointing_game` -- ``xmodal.pointing``; figures in ``xmodal.plotting`` (not imported here)
"""

from xmodal.attention import CrossModalAttention, ImageKV, attend
from xmodal.attention_maps import (
    AttentionMaps,
    compose,
    fuse_heads,
    record_attention,
    resampler_rollout,
    rollout,
)
from xmodal.blocks import GatedCrossAttentionBlock
from xmodal.feedforward import FeedForward
from xmodal.gating import TanhGate
from xmodal.masks import (
    MEDIA_POLICIES,
    PreparedMask,
    media_attention_mask,
    media_locations_from_ids,
    normalize_attention_mask,
    prepare_attention_mask,
    visible_media_range,
)
from xmodal.pointing import pointing_game
from xmodal.resampler import PerceiverResampler
from xmodal.sparse import (
    block_mask_from_keep_mask,
    flex_attend,
    media_block_mask,
    sparse_cross_attention,
)

__version__ = "0.1.0"

__all__ = [
    "MEDIA_POLICIES",
    "AttentionMaps",
    "CrossModalAttention",
    "FeedForward",
    "GatedCrossAttentionBlock",
    "ImageKV",
    "PerceiverResampler",
    "PreparedMask",
    "TanhGate",
    "__version__",
    "attend",
    "block_mask_from_keep_mask",
    "compose",
    "flex_attend",
    "fuse_heads",
    "media_attention_mask",
    "media_block_mask",
    "media_locations_from_ids",
    "normalize_attention_mask",
    "pointing_game",
    "prepare_attention_mask",
    "record_attention",
    "resampler_rollout",
    "rollout",
    "sparse_cross_attention",
    "visible_media_range",
]

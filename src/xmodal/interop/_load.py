"""Strict, all-or-nothing loading of converted weights, and small helpers the converters share.

Legend: ``D`` text width, ``E`` image width, ``h`` heads, ``d`` head width (no tensors are
reshaped here; the converters carry their own shape comments).

Every converter in :mod:`xmodal.interop` works the same way:

1. read the foreign module's (or checkpoint's) tensors into a :class:`Remapper`, which records
   which foreign keys were taken and under which xmodal name each tensor lands;
2. build the xmodal module;
3. call :meth:`Remapper.load_into`, which compares the mapped tensors with the module's own
   ``state_dict`` -- foreign keys that were asked for but absent, foreign keys nobody asked for,
   xmodal keys that nothing filled, shapes that differ -- and raises one
   :class:`ConversionError` naming *every* offending key before a single value is copied.

Only when all checks pass is ``load_state_dict(strict=True)`` called, so a failed conversion
never leaves a module half loaded.

Also here: :func:`match_source` (dtype, device and train/eval mode of the original),
:func:`gated_activation` (HF ``hidden_act`` -> ``FeedForward`` activation) and
:func:`rms_qk_norm` (q/k RMSNorms with a foreign epsilon).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["ConversionError", "Remapper", "gated_activation", "match_source", "rms_qk_norm"]

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """Foreign weights do not fit the xmodal module they are converted into.

    Attributes:
        missing: foreign keys the converter needed but the source lacks, plus xmodal keys that
            nothing filled.
        unexpected: foreign keys the converter does not know what to do with.
        mismatched: ``(xmodal key, foreign origin, got shape, expected shape)`` for each tensor
            whose shape differs from the xmodal module's.
    """

    def __init__(
        self,
        source: str,
        target: str,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        for key, origin, got, expected in mismatched:
            parts.append(
                f"shape mismatch: {origin} has shape {got}, but {target}.{key} expects {expected}"
            )
        super().__init__(
            f"cannot convert {source} into {target}; nothing was loaded. " + "; ".join(parts)
        )


class Remapper:
    """Collects foreign tensors under xmodal names and loads them only if everything fits.

    Args:
        foreign: the source's tensors by their own names (a ``state_dict`` or part of one).
        source: how error messages name the source, e.g. ``"nn.MultiheadAttention"``.
        prefix: prepended to foreign keys in error messages (the part of a checkpoint key that
            was stripped before the converter saw it).
    """

    def __init__(self, foreign: Mapping[str, Tensor], *, source: str, prefix: str = "") -> None:
        self.foreign = dict(foreign)
        self.source = source
        self.prefix = prefix
        self.mapped: dict[str, Tensor] = {}
        self.origin: dict[str, str] = {}
        self._claimed: set[str] = set()  # xmodal keys a converter meant to fill
        self._taken: set[str] = set()  # foreign keys read
        self._absent: list[str] = []  # foreign keys asked for but not there
        self._bad_split: list[tuple[str, str, tuple[int, ...]]] = []

    def has(self, key: str) -> bool:
        """Whether the source holds ``key`` (does not mark it as taken)."""
        return key in self.foreign

    def take(self, key: str) -> Tensor | None:
        """Mark ``key`` as used and return its tensor; record it as missing if absent."""
        if key not in self.foreign:
            self._absent.append(self.prefix + key)
            return None
        self._taken.add(key)
        return self.foreign[key]

    def ignore(self, keys: Iterable[str]) -> None:
        """Mark foreign keys as deliberately unused (e.g. a rotary buffer cross-attention skips)."""
        for key in keys:
            if key in self.foreign:
                self._taken.add(key)

    def put(self, key: str, tensor: Tensor | None, origin: str) -> None:
        """Place ``tensor`` under the xmodal name ``key``; ``None`` (source missing) is skipped."""
        self._claimed.add(key)
        if tensor is not None:
            self.mapped[key] = tensor
            self.origin[key] = self.prefix + origin

    def copy(self, foreign_key: str, key: str) -> None:
        """``put(key, take(foreign_key))``: the common one-to-one case."""
        self.put(key, self.take(foreign_key), foreign_key)

    def split(self, foreign_key: str, keys: list[str], sizes: list[int] | None = None) -> None:
        """Cut one fused foreign tensor along its first dimension into xmodal tensors, in order.

        ``sizes`` defaults to equal parts. A tensor whose first dimension does not add up is
        reported as a shape mismatch (with its whole shape) instead of being cut.
        """
        self._claimed.update(keys)
        tensor = self.take(foreign_key)
        if tensor is None:
            return
        total = tensor.shape[0] if tensor.dim() > 0 else 0
        if sizes is None:
            sizes = [total // len(keys)] * len(keys)
        if tensor.dim() == 0 or sum(sizes) != total:
            self._bad_split.append((keys[0], self.prefix + foreign_key, tuple(tensor.shape)))
            return
        offset = 0
        for key, size in zip(keys, sizes, strict=True):
            self.put(
                key, tensor[offset : offset + size], f"{foreign_key}[{offset}:{offset + size}]"
            )
            offset += size

    def load_into(self, module: nn.Module) -> None:
        """Check everything, then load the mapped tensors into ``module`` with ``strict=True``.

        Raises:
            ConversionError: naming every missing, unexpected and mis-shaped key. ``module`` is
                untouched when it is raised.
        """
        target = module.state_dict()
        name = type(module).__name__
        missing = list(self._absent)
        missing += sorted(
            f"{name}.{k} (nothing maps to it)" for k in target if k not in self._claimed
        )
        unexpected = sorted(self.prefix + k for k in self.foreign if k not in self._taken)
        mismatched = [
            (key, origin, got, tuple(target[key].shape) if key in target else ())
            for key, origin, got in self._bad_split
        ]
        for key, tensor in self.mapped.items():
            if key not in target:
                unexpected.append(f"{self.origin[key]} (-> {name}.{key}, which does not exist)")
            elif tuple(tensor.shape) != tuple(target[key].shape):
                mismatched.append(
                    (key, self.origin[key], tuple(tensor.shape), tuple(target[key].shape))
                )
        if missing or unexpected or mismatched:
            raise ConversionError(
                self.source, name, missing=missing, unexpected=unexpected, mismatched=mismatched
            )
        with torch.no_grad():
            module.load_state_dict(self.mapped, strict=True)
        logger.debug("loaded %d tensors from %s into %s", len(self.mapped), self.source, name)


def match_source(module: nn.Module, source: nn.Module | Tensor) -> nn.Module:
    """Move ``module`` to the device and floating dtype of ``source``'s first parameter, and copy
    its train/eval mode (so a converted module behaves like the original from the first call)."""
    ref = source if isinstance(source, Tensor) else next(source.parameters(), None)
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    if isinstance(source, nn.Module):
        module.train(source.training)
    return module


# HF ``hidden_act`` of a gated (gate/up/down) MLP -> the xmodal FeedForward activation.
_GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def gated_activation(hidden_act: object, *, source: str) -> str:
    """Name the :class:`~xmodal.FeedForward` activation for an HF ``gate_proj/up_proj/down_proj``
    MLP with activation ``hidden_act``; a ``ValueError`` names any other activation."""
    if not isinstance(hidden_act, str) or hidden_act not in _GATED_ACTIVATIONS:
        raise ValueError(
            f"{source} uses hidden_act={hidden_act!r}; xmodal's FeedForward supports "
            f"{sorted(_GATED_ACTIVATIONS)} for a gated MLP"
        )
    return _GATED_ACTIVATIONS[hidden_act]


def rms_qk_norm(attn: nn.Module, head_dim: int, eps: float) -> None:
    """Give ``attn`` (a CrossModalAttention built with ``qk_norm=True``) q/k RMSNorms with the
    foreign epsilon: ``CrossModalAttention`` builds them with PyTorch's default epsilon."""
    attn.q_norm = nn.RMSNorm(head_dim, eps=eps)
    attn.k_norm = nn.RMSNorm(head_dim, eps=eps)

"""Checkpoints: ``safetensors`` weights with a JSON config in the metadata, written atomically.

Legend: none -- this module moves whole ``state_dict`` s, whatever their shapes.

* :func:`save_checkpoint` / :func:`load_checkpoint` -- a model's weights as ``safetensors``
  (no pickle on load), with a JSON config and any other JSON metadata in the file's header.
* :func:`save_training_state` / :func:`load_training_state` -- optimizer and loop state for
  ``--resume``, via ``torch.save`` and ``torch.load(weights_only=True)`` (plain tensors and
  containers only: no arbitrary pickled objects are executed on load).

Every file is written atomically: to a temporary file in the same directory, flushed and
``fsync``-ed, then renamed over the target with :func:`os.replace`. A crash or an exception
during a save leaves the previous file as it was, and no temporary file behind.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "load_training_state",
    "read_metadata",
    "save_checkpoint",
    "save_figure",
    "save_training_state",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per write() call


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new file.

    The bytes go to a temporary file in the same directory (so the rename cannot cross file
    systems), which is flushed and fsync-ed, then renamed over ``path``; the directory is fsync-ed
    too where the platform allows. On any exception the temporary file is removed and ``path``
    is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:  # owns (and closes) the descriptor from here on
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: a normal mode
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):
                f.write(view[start : start + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text (JSON, CSV, TOML, Markdown)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | os.PathLike[str], **savefig_kwargs: Any) -> None:
    """Render a matplotlib ``Figure`` in memory, then write it with :func:`atomic_write_bytes`.

    The format follows ``path``'s suffix (as ``Figure.savefig`` would choose it).
    """
    buffer = io.BytesIO()
    suffix = Path(path).suffix.lstrip(".") or "png"
    fig.savefig(buffer, format=suffix, **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel and torch.compile wrappers, in one place."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | Mapping[str, Tensor],
    *,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save a model's weights as ``safetensors``, with ``config`` as JSON in the header.

    Args:
        path: the file to (atomically) write, conventionally ``*.safetensors``.
        model: a module (DDP and ``torch.compile`` wrappers are unwrapped, so the keys carry
            no ``module.`` / ``_orig_mod.`` prefix) or a ready ``state_dict``.
        config: JSON-serialisable dict that rebuilds the model; stored under ``"config"``.
        metadata: other JSON-serialisable values (step, metrics, ...), stored one header entry
            per key, JSON-encoded.
    """
    if isinstance(model, nn.Module):
        state = _unwrap(model).state_dict()
    elif isinstance(model, Mapping):
        state = dict(model)
    else:
        raise TypeError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    header = {"format": "xmodal", "config": json.dumps(dict(config), sort_keys=True)}
    for key, value in (metadata or {}).items():
        if key in header:
            raise ValueError(f"metadata key {key!r} is reserved; use another name")
        header[key] = json.dumps(value, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, st_save(tensors, metadata=header))
    logger.info("saved checkpoint %s (%d tensors)", path, len(tensors))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a checkpoint written by :func:`save_checkpoint`, JSON-decoded.

    Reads only the header, not the weights.
    """
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != "xmodal" or "config" not in raw:
        raise ValueError(
            f"{path} is not an xmodal checkpoint: its safetensors header has keys "
            f"{sorted(raw)}, expected 'format' = 'xmodal' and 'config'"
        )
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``(state_dict, metadata)`` from a checkpoint; ``metadata["config"]`` is the config.

    No pickle is involved: the weights are ``safetensors`` and the metadata is JSON.
    """
    metadata = read_metadata(path)
    state = st_load(Path(path).read_bytes())
    return {k: v.to(device) for k, v in state.items()}, metadata


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` optimizer / loop state (tensors, numbers, strings, containers).

    Loadable with ``torch.load(weights_only=True)``: keep it to plain types.
    """
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load what :func:`save_training_state` wrote, with ``weights_only=True`` (no code runs)."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a training-state dict, got {type(state).__name__}")
    return state

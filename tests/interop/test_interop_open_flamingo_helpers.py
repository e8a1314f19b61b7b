"""``load_open_flamingo`` against OpenFlamingo's own ``helpers.py`` (when it is installed).

Legend: ``b`` batch, ``t`` text tokens, ``m`` media, ``f`` frames, ``n`` tokens per frame,
``l`` latents, ``D`` text width, ``E`` visual width.

The ``open-flamingo`` wheel pins ``torch==2.0.1`` and imports ``open_clip`` from its package
``__init__``, so it cannot be a normal test dependency. Install it without dependencies
(``pip install --no-deps open-flamingo==2.0.1``) and this file loads ``open_flamingo/src/
helpers.py`` -- which needs only torch and einops -- straight from the file; otherwise it skips
(``test_interop_flamingo.py`` covers the same layout with flamingo-pytorch).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from xmodal import media_attention_mask, media_locations_from_ids
from xmodal.interop import from_flamingo_pytorch, load_open_flamingo

pytest.importorskip("einops_exts")

IMG = 99
IDS = [[5, 6, IMG, 7, 8, IMG, 9, 10], [5, 6, 7, 8, 9, 10, 0, 0], [IMG, 5, 6, 7, 8, 9, 0, 0]]
B, T, M, D, E, L = 3, 8, 2, 32, 24, 5
F64 = {"atol": 1e-12, "rtol": 1e-10}


def _helpers() -> ModuleType:
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-flamingo is not installed (pip install --no-deps open-flamingo)")
    path = Path(next(iter(spec.submodule_search_locations))) / "src" / "helpers.py"
    # Named as it would be when imported normally, so from_flamingo_pytorch recognises it.
    module_spec = importlib.util.spec_from_file_location("open_flamingo.src.helpers", path)
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gate"):
                p.uniform_(-1.0, 1.0)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
            elif "emb" not in name and name != "latents":
                p.normal_(0.0, 0.2)
    return module.double().eval()


def test_load_open_flamingo_matches_open_flamingo_helpers() -> None:
    of = _helpers()
    perceiver = _randomize(
        of.PerceiverResampler(
            dim=E, depth=2, dim_head=8, heads=4, num_latents=L, max_num_media=M, max_num_frames=2
        )
    )
    block = _randomize(of.GatedCrossAttentionBlock(dim=D, dim_visual=E, dim_head=8, heads=4))
    state = {f"perceiver.{k}": v for k, v in perceiver.state_dict().items()}
    state |= {
        f"lang_encoder.gated_cross_attn_layers.1.{k}": v for k, v in block.state_dict().items()
    }
    loaded = load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)
    assert loaded.perceiver is not None

    video = torch.randn(B, M, 2, 4, E, dtype=torch.float64)  # (b, m, f, n, E)
    text = torch.randn(B, T, D, dtype=torch.float64)
    locations = media_locations_from_ids(torch.tensor(IDS), IMG)
    mask = media_attention_mask(locations, L, num_media=M, policy=loaded.policy)
    sees = mask.any(dim=-1)
    with torch.no_grad():
        latents = perceiver(video)  # (b, m, l, E)
        torch.testing.assert_close(loaded.perceiver(video), latents, **F64)
        expected = block(text, latents, media_locations=locations)
        ours = loaded.blocks[1](text, latents, mask)
    torch.testing.assert_close(ours[sees], expected[sees], **F64)
    assert torch.equal(ours[~sees], text[~sees])
    # The module converter reads the same modules directly, heads included.
    with torch.no_grad():
        torch.testing.assert_close(from_flamingo_pytorch(perceiver)(video), latents, **F64)
        direct = from_flamingo_pytorch(block)(text, latents, mask)
    torch.testing.assert_close(direct, ours, rtol=0, atol=0)

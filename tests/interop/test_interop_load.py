"""The strict loader behind every converter, and the promise that ``xmodal`` needs no peers.

Legend: ``D`` width; no attention is run here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from xmodal import CrossModalAttention
from xmodal.interop import ConversionError
from xmodal.interop._load import Remapper, gated_activation

D = 8


def _foreign() -> dict[str, torch.Tensor]:
    return {
        "q.weight": torch.randn(D, D),
        "kv.weight": torch.randn(2 * D, D),
        "o.weight": torch.randn(D, D),
    }


def _map(rm: Remapper) -> None:
    rm.copy("q.weight", "text_query.weight")
    rm.split("kv.weight", ["image_key.weight", "image_value.weight"])
    rm.copy("o.weight", "output_proj.weight")


def test_a_clean_mapping_loads_every_tensor() -> None:
    attn = CrossModalAttention(D, 2, bias=False)
    foreign = _foreign()
    rm = Remapper(foreign, source="toy")
    _map(rm)
    rm.load_into(attn)
    assert torch.equal(attn.image_key.weight, foreign["kv.weight"][:D])
    assert torch.equal(attn.image_value.weight, foreign["kv.weight"][D:])
    assert attn.image_key.weight.data_ptr() != foreign["kv.weight"].data_ptr()  # copied


def test_every_problem_is_named_at_once_and_nothing_is_loaded() -> None:
    attn = CrossModalAttention(D, 2, bias=False)
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    foreign = _foreign()
    del foreign["o.weight"]  # missing
    foreign["q.weight"] = torch.randn(D, D + 1)  # wrong shape; loaded first if anything were
    foreign["extra.bias"] = torch.zeros(D)  # unexpected
    rm = Remapper(foreign, source="toy", prefix="model.")
    _map(rm)
    with pytest.raises(ConversionError) as info:
        rm.load_into(attn)
    err = info.value
    assert err.missing == ["model.o.weight"]
    assert err.unexpected == ["model.extra.bias"]
    assert err.mismatched == [("text_query.weight", "model.q.weight", (D, D + 1), (D, D))]
    message = str(err)
    assert message.startswith("cannot convert toy into CrossModalAttention; nothing was loaded")
    assert "model.q.weight has shape (8, 9), but CrossModalAttention.text_query.weight" in message
    for key, value in attn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_fused_tensor_that_does_not_split_is_a_shape_mismatch() -> None:
    attn = CrossModalAttention(D, 2, bias=False)
    foreign = _foreign()
    foreign["kv.weight"] = torch.randn(2 * D + 1, D)
    rm = Remapper(foreign, source="toy")
    _map(rm)
    with pytest.raises(ConversionError, match=r"kv.weight has shape \(17, 8\)"):
        rm.load_into(attn)


def test_an_unmapped_target_key_is_reported() -> None:
    attn = CrossModalAttention(D, 2, bias=False)
    rm = Remapper(_foreign(), source="toy")
    rm.copy("q.weight", "text_query.weight")
    rm.ignore(["kv.weight", "o.weight"])
    with pytest.raises(ConversionError, match=r"CrossModalAttention.image_key.weight \(nothing"):
        rm.load_into(attn)


def test_gated_activation_names_what_it_supports() -> None:
    assert gated_activation("silu", source="x") == "swiglu"
    assert gated_activation("gelu", source="x") == "geglu"
    with pytest.raises(
        ValueError, match=r"x uses hidden_act='tanh'; .* \['gelu', 'silu', 'swish'\]"
    ):
        gated_activation("tanh", source="x")


def test_importing_xmodal_interop_imports_no_peer_package() -> None:
    code = (
        "import sys, xmodal, xmodal.interop; "
        "bad = [m for m in ('transformers', 'flamingo_pytorch', 'einops') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""Checkpoints: safetensors + JSON config, no pickle, atomic writes that survive a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from xmodal import checkpoint as ckpt
from xmodal.checkpoint import (
    load_checkpoint,
    load_training_state,
    read_metadata,
    save_checkpoint,
    save_training_state,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_round_trip_weights_config_and_metadata(tmp_path: Path) -> None:
    model = _model(0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, config={"dim": 4, "kind": "x"}, metadata={"step": 7})
    state, meta = load_checkpoint(path)
    assert meta["config"] == {"dim": 4, "kind": "x"}
    assert meta["step"] == 7
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k  # bit-exact: safetensors stores the raw bytes
    assert read_metadata(path)["step"] == 7
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_wrappers_are_unwrapped(tmp_path: Path) -> None:
    model = _model(0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, nn.DataParallel(model), config={})
    state, _ = load_checkpoint(path)
    assert not any(k.startswith("module.") for k in state)
    assert state.keys() == model.state_dict().keys()


def test_crash_during_save_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    old = _model(0)
    save_checkpoint(path, old, config={"version": 1})

    # Make the second save die midway: after its first chunk of bytes reached the temp file.
    monkeypatch.setattr(ckpt, "_CHUNK", 64)
    real_fdopen = ckpt.os.fdopen
    writes = {"n": 0}

    class Dying:
        def __init__(self, f: object) -> None:
            self.f = f

        def __enter__(self) -> Dying:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def write(self, b: bytes) -> int:
            writes["n"] += 1
            if writes["n"] == 2:
                raise OSError("disk on fire")
            return self.f.write(b)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: Dying(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(path, _model(1), config={"version": 2})
    assert writes["n"] == 2

    state, meta = load_checkpoint(path)
    assert meta["config"] == {"version": 1}
    for k, v in old.state_dict().items():
        assert torch.equal(state[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_crash_before_rename_leaves_previous_training_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1})

    def boom(*args: object) -> None:
        raise KeyboardInterrupt  # even a BaseException cleans up

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(path, {"step": 2})
    assert load_training_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_training_state_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "state.pt"
    save_training_state(path, {"optimizer": opt.state_dict(), "step": 5, "rows": [{"a": 1.0}]})
    back = load_training_state(path)
    assert back["step"] == 5
    assert back["rows"] == [{"a": 1.0}]
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": PurePosixPath("not/a/tensor")}, path)  # any class outside the allowlist
    with pytest.raises(Exception, match=r"weights_only|Unsupported|global"):
        load_training_state(path)


def test_foreign_safetensors_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"hello": "world"})
    with pytest.raises(ValueError, match=r"not an xmodal checkpoint.*\['hello'\]"):
        load_checkpoint(path)


def test_reserved_metadata_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metadata key 'config' is reserved"):
        save_checkpoint(tmp_path / "m.safetensors", _model(0), config={}, metadata={"config": 1})


def test_metadata_is_json_in_the_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(0), config={"a": [1, 2]})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["config"]) == {"a": [1, 2]}

"""``xmodal train`` / ``xmodal eval`` on the tiny config: files, exact resume, DDP, the table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.checkpoint import load_checkpoint
from xmodal.cli.main import main
from xmodal.data.sort_of_clevr import generate
from xmodal.training import batch_indices, load_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sort_of_clevr_tiny.toml"


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--set", f"train.out_dir='{tmp_path}'", *extra]


def test_train_writes_the_run_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *_tiny(tmp_path), "--no-progress"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.toml",
        "model.safetensors",
        "train_state.pt",
        "metrics.csv",
        "learning_curve.png",
        "summary.json",
    } <= names
    # The resolved config is valid TOML and loads back to the same run.
    resolved = tomllib.loads((tmp_path / "config.toml").read_text())
    assert resolved["train"]["out_dir"] == str(tmp_path)
    assert load_config(tmp_path / "config.toml").to_dict() == resolved
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8]  # 16 images / 4 per step, 2 epochs
    assert {"val_relational", "val_non_relational", "val_closest", "wall_s"} <= set(rows[0])
    _, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["step"] == 8
    assert meta["config"]["model"]["dim"] == 16
    assert "done: 8 steps" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    overrides = ["train.epochs=3"]
    full = train(load_config(TINY, [*overrides, f"train.out_dir='{a}'"]))
    config_b = load_config(TINY, [*overrides, f"train.out_dir='{b}'"])
    first = train(config_b, stop_at_step=4)  # "interrupted" after the first epoch
    assert first["stopped_early"]
    assert max(first["step_losses"]) == 4
    rest = train(config_b, resume=True)
    assert sorted(rest["step_losses"]) == list(range(5, 13))
    for step, loss in rest["step_losses"].items():
        assert loss == full["step_losses"][step], step  # bit-identical, not just close
    state_a, _ = load_checkpoint(a / "model.safetensors")
    state_b, _ = load_checkpoint(b / "model.safetensors")
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    with open(b / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 8, 12]


def test_resume_refuses_a_half_written_save(tmp_path: Path) -> None:
    config = load_config(TINY, [f"train.out_dir='{tmp_path}'"])
    train(config, stop_at_step=4)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "old.safetensors")
    train(config, resume=True)  # now at step 8
    shutil.copy(tmp_path / "old.safetensors", tmp_path / "model.safetensors")  # weights at 4
    with pytest.raises(ValueError, match=r"is at step 4 but .*train_state\.pt at step 8"):
        train(config, resume=True)


def test_batch_indices_split_a_step_between_processes() -> None:
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    one = batch_indices(order, 1, rank=0, world=1, batch=8)
    two = torch.cat([batch_indices(order, 1, rank=r, world=2, batch=4) for r in range(2)])
    assert torch.equal(one, two)  # 2 processes x 4 images == 1 process x 8 images


def test_set_overrides_and_their_errors() -> None:
    config = load_config(
        TINY, ["train.lr=0.5", "model.kind=cnn_mlp", "model.stem_channels=[2,2,2]"]
    )
    assert config.train.lr == 0.5
    assert config.model.kind == "cnn_mlp"
    assert config.model.stem_channels == (2, 2, 2)
    with pytest.raises(ValueError, match=r"override 'lr=1' must look like model\.KEY=VALUE"):
        load_config(TINY, ["lr=1"])
    with pytest.raises(ValueError, match=r"unknown train config key\(s\) \['lr_max'\]"):
        load_config(TINY, ["train.lr_max=1"])


def test_eval_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(load_config(TINY, [f"train.out_dir='{tmp_path}'"]))
    out_json = tmp_path / "eval.json"
    ckpt = str(tmp_path / "model.safetensors")
    assert main(["eval", "--checkpoint", ckpt, "--images", "5", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "CNN+RN (Santoro et al. 2017)" in text
    assert "94%" in text
    assert "63%" in text
    assert "kimhc6028" in text
    assert "89%" in text
    metrics = json.loads(out_json.read_text())
    assert 0.0 <= metrics["relational"] <= 1.0
    assert 0.0 <= metrics["non_relational"] <= 1.0
    assert set(metrics["per_subtype"]) == {"shape", "left", "top", "closest", "furthest", "count"}
    assert metrics["num_questions"] == 100
    # issue 7: the pointing game of the chosen map and its chance level (fresh scenes carry
    # the object table, so eval scores where the cross-attention looks)
    assert 0.0 <= metrics["pointing_game"] <= 1.0
    assert 0.0 < metrics["pointing_game_chance"] < 1.0
    assert "pointing game (" in text
    assert "colour word, heads averaged: layer0 " in text  # per layer, then the rollout
    assert "rollout " in text


def test_eval_on_a_published_style_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Codes only, float images, questions not grouped by image: as converted from the
    # published generator's pickle.
    train(load_config(TINY, [f"train.out_dir='{tmp_path}'"]))
    d = generate(3, seed=5)
    perm = np.random.default_rng(0).permutation(len(d))
    path = tmp_path / "published.npz"
    np.savez(
        path,
        images=d.images / 255.0,
        questions=d.questions[perm],
        image_index=d.image_index[perm],
        answers=d.answers[perm],
    )
    out_json = tmp_path / "e.json"
    ckpt = str(tmp_path / "model.safetensors")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(path), "--json", str(out_json)]) == 0
    shuffled = json.loads(out_json.read_text())
    d.save(tmp_path / "ours.npz")
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                ckpt,
                "--data",
                str(tmp_path / "ours.npz"),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    ours = json.loads(out_json.read_text())
    assert shuffled["num_questions"] == ours["num_questions"] == 60
    assert shuffled["relational"] == pytest.approx(ours["relational"])  # same questions, any order
    capsys.readouterr()


# Not marked slow (about 5 s): issue 6 asks CI to run this 2-process DDP smoke test.
def test_torchrun_two_processes_end_identical(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "xmodal.cli.main",
        "train",
        *_tiny(tmp_path, "--no-progress"),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["replicas_identical"] is True
    assert len(set(summary["replica_digests"])) == 1
    assert len(summary["replica_digests"]) == 2
    assert summary["steps"] == 4  # 16 images / (4 per process x 2 processes) x 2 epochs


def test_demo_answers_fresh_scenes_and_writes_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(load_config(TINY, [f"train.out_dir='{tmp_path}'"]))
    ckpt = str(tmp_path / "model.safetensors")
    out = tmp_path / "figures"
    assert main(["demo", "--checkpoint", ckpt, "--images", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "60 questions (3 fresh scenes" in text
    assert "CNN+RN (Santoro et al. 2017)" in text
    assert text.count("(truth: ") == 8  # the examples
    assert (out / "scenes.png").stat().st_size > 0
    for scene in range(3):
        assert (out / f"attention_{scene}.png").stat().st_size > 0


def test_demo_notebook_keeps_the_notebook_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--notebook"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Cross-modal attention output shape: torch.Size([4, 20, 256])" in lines
    assert "Attention weights shape: torch.Size([4, 8, 20, 196])" in lines


def test_shipped_checkpoint_is_small_and_loads() -> None:
    from xmodal.cli.eval import shipped_checkpoint
    from xmodal.training import load_model

    path = shipped_checkpoint()
    assert path.exists(), f"{path} is missing: copy a trained run's model.safetensors there"
    assert path.stat().st_size <= 10 * 2**20
    model, meta = load_model(path)
    assert model.config.kind == "flamingo"
    assert meta["config"]["train"]["train_images"] == 9800  # the output of the full config

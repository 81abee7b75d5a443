"""The README's main job: the demo runs end to end on a fresh folder, and a second run changes nothing; with
`--model clip_vit_b_32` it embeds with the CLIP (random weights, said so) and shows zero-shot agreement."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from imgemb_assets.core.lake import tables
from imgemb_support.location import run_user_process


def _run_demo(data_dir: Path, torch_home: Path, *options: str) -> str:
    # An empty torch cache and no weights setting: the offline case, which must fall back loudly.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGEMB_", "DAGSTER_"))}
    env["TORCH_HOME"] = str(torch_home)
    done = run_user_process(
        [sys.executable, "-m", "imgemb_assets.demo", "--data-dir", str(data_dir), *options], env, timeout_s=900
    )
    return done.stdout + done.stderr


def _counts(lake: Path) -> dict[str, dict[str, int]]:
    """Rows per table and prefix, read back with polars."""
    out = {}
    for name in tables.ALL_TABLES:
        frame = pl.read_delta(str(lake / name))
        if name == tables.SALES:
            out[name] = {"*": frame.height}
        else:
            out[name] = dict(frame.group_by("prefix").len().iter_rows())
    return out


@pytest.mark.slow
def test_demo_runs_twice_with_consistent_and_unchanged_tables(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    output = _run_demo(data_dir, tmp_path / "torch")
    assert "RANDOM WEIGHTS" in output
    assert "images/s" in output
    assert "dagster dev -w workspace.yaml" in output
    assert "DAGSTER_HOME=" + str(data_dir / "dagster_home") in output
    first = _counts(data_dir / "lake")
    prefixes = sorted(first[tables.RAW_IMAGE_MANIFEST])
    assert len(prefixes) >= 3
    for prefix in prefixes:
        manifest = first[tables.RAW_IMAGE_MANIFEST][prefix]
        downscaled = first[tables.DOWNSCALED_IMAGES][prefix]
        rejected = first[tables.REJECTED_IMAGES].get(prefix, 0)
        assert manifest == downscaled + rejected
        assert first[tables.IMAGE_EMBEDDINGS][prefix] == first[tables.IMAGES_WITH_SALES][prefix] < downscaled
    assert sum(first[tables.REJECTED_IMAGES].values()) == 5  # the sample's broken files
    embeddings = pl.read_delta(str(data_dir / "lake" / tables.IMAGE_EMBEDDINGS))
    assert embeddings["embedding"].list.len().unique().to_list() == [2048]
    assert embeddings["model_id"].unique().to_list() == ["torchvision/resnet50/random-seed0/fp32"]

    # The demo's own suggestion works: `imgemb similar` on one of its images, with the variables it wrote.
    (command,) = [
        line.strip()
        for line in output.splitlines()
        if line.strip().startswith("DAGSTER_HOME=") and "imgemb similar img_" in line
    ]
    image_id = command.rsplit(" ", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGEMB_", "DAGSTER_"))}
    env |= dict(shlex.split(line)[0].split("=", 1) for line in (data_dir / "demo.env").read_text().splitlines())
    similar = subprocess.run([str(Path(sys.executable).with_name("imgemb")), "similar", image_id, "--k", "3"],
                             env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert similar.returncode == 0, similar.stderr
    lines = similar.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    listed = [line.split()[1] for line in lines[header + 1 :] if line.strip()]
    assert len(listed) == 3 and image_id not in listed and all(i in set(embeddings["image_id"]) for i in listed)

    _run_demo(data_dir, tmp_path / "torch")
    assert _counts(data_dir / "lake") == first
    again = pl.read_delta(str(data_dir / "lake" / tables.IMAGE_EMBEDDINGS))
    assert again.sort("image_id").equals(embeddings.sort("image_id")), "same tables on a second run"


def _demo_env(data_dir: Path) -> dict[str, str]:
    """A user's shell after sourcing the demo's demo.env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGEMB_", "DAGSTER_"))}
    return env | dict(shlex.split(line)[0].split("=", 1) for line in (data_dir / "demo.env").read_text().splitlines())


@pytest.mark.slow
def test_the_demo_runs_with_the_clip_model_and_shows_zero_shot_agreement_as_noise(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    output = _run_demo(data_dir, tmp_path / "torch", "--model", "clip_vit_b_32", "--images-per-prefix", "4")
    assert "RANDOM WEIGHTS" in output and "runs clip_vit_b_32 with RANDOM-initialised weights" in output
    assert "images/s (clip_vit_b_32, random weights)" in output
    assert "Zero-shot categories: each image labelled by the nearest of 5 prompts" in output
    assert "(noise: random weights)" in output
    lake = data_dir / "lake"
    embeddings = pl.read_delta(str(lake / tables.IMAGE_EMBEDDINGS))
    assert embeddings["model_id"].unique().to_list() == ["open_clip/clip_vit_b_32/random-seed0/fp32"]
    assert embeddings["embedding"].list.len().unique().to_list() == [512]
    evaluation = pl.read_delta(str(lake / tables.EMBEDDING_EVALUATION))
    assert evaluation.height == 3 and evaluation["zero_shot_classes"].to_list() == [5, 5, 5]
    assert evaluation["zero_shot_agreement"].is_not_null().all()
    assert evaluation["zero_shot_agreement_chance"].is_not_null().all()

    # The location the UI and the CLI load from demo.env embeds with the same model: a photo query finds its index.
    env = _demo_env(data_dir)
    assert env["IMGEMB_MODEL"] == "clip_vit_b_32"
    photo = next((data_dir / "raw-images").rglob("img_*.jpg"))
    similar = subprocess.run([str(Path(sys.executable).with_name("imgemb")), "similar", "--image", str(photo), "--k", "2"],
                             env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert similar.returncode == 0, similar.stderr
    assert "from the search index of model open_clip/clip_vit_b_32/random-seed0/fp32" in similar.stdout

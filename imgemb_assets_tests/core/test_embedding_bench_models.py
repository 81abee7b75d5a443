"""The embedding benchmark's several-models form: `--model` repeated, one side-by-side line per model (no timing)."""

from __future__ import annotations

from imgemb_assets.core.embedding_bench import _parser, side_by_side


def test_model_repeats_and_each_model_gets_a_line_with_the_reference_where_measured() -> None:
    assert _parser().parse_args([]).model is None  # main() then measures resnet50 alone, as before
    assert _parser().parse_args(["--model", "resnet50", "--model", "clip_vit_b_32"]).model == [
        "resnet50",
        "clip_vit_b_32",
    ]
    common = {"batch_size": 16, "ratio": 0.5}
    lines = side_by_side(
        [
            {"model": "resnet50", "embedding_width": 2048, "model_only_img_s": 10.0, "embed_stage_img_s": 5.0}
            | common
            | {"reference_model_only_img_s": 8.31, "reference_embed_stage_img_s": 4.0},
            {"model": "clip_vit_b_32", "embedding_width": 512, "model_only_img_s": 12.0, "embed_stage_img_s": 6.0}
            | common,
        ]
    )
    assert lines[0].split() == ["model", "width", "batch", "model-only", "embed-stage", "ratio", "ref",
                                "model-only", "ref", "embed-stage"]  # fmt: skip
    assert lines[1].split() == ["resnet50", "2048", "16", "10.0", "5.0", "0.50", "8.3", "4.0"]
    assert lines[2].split() == ["clip_vit_b_32", "512", "16", "12.0", "6.0", "0.50", "-", "-"]

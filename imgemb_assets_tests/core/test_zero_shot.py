"""Zero-shot agreement on constructed vectors whose nearest prompt is known, so a broken score fails a test:
the agreement, its chance level (labels shuffled, as for kNN agreement), the noise label of random weights,
the prompts, and what is left out.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from imgemb_assets.core.evaluation.scores import (
    NOISE_LABEL,
    ZERO_SHOT_PROMPT_TEMPLATE,
    evaluate_embeddings,
    zero_shot_agreement,
    zero_shot_prompts,
)

CLASSES = ["bags", "hats", "shoes"]
# One text vector per class prompt: three axes of a 4-d space.
CLASS_VECTORS = np.eye(3, 4, dtype=np.float32)


def _towards(class_index: int, off: float = 0.1) -> np.ndarray:
    """A vector nearest (cosine) to one class's vector, with a little of the fourth axis."""
    vector = np.full(4, 0.0, np.float32)
    vector[class_index], vector[3] = 1.0, off
    return vector


def test_images_nearest_their_own_prompt_agree_fully_and_chance_is_the_shuffled_labels_share() -> None:
    labels = ["bags"] * 4 + ["hats"] * 4 + ["shoes"] * 2
    vectors = np.stack([_towards(CLASSES.index(label)) for label in labels])

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=False)

    assert result.agreement == 1.0
    # Predictions are the labels: shuffled, an image keeps its label with probability its label's share.
    assert result.chance == pytest.approx(0.4 * 0.4 + 0.4 * 0.4 + 0.2 * 0.2)
    assert (result.classes, result.scored, result.left_out, result.notes) == (3, 10, 0, ())
    assert result.caveat is None and "zero_shot_caveat" not in result.metadata()


def test_the_agreement_counts_each_image_whose_nearest_prompt_is_its_label() -> None:
    # Ten shoes: seven nearest the shoes prompt, three nearest the bags prompt; five hats, all nearest hats.
    labels = ["shoes"] * 10 + ["hats"] * 5
    vectors = np.stack([_towards(2)] * 7 + [_towards(0)] * 3 + [_towards(1)] * 5)

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=False)

    assert result.agreement == pytest.approx(12 / 15)
    # predicted: bags 3, hats 5, shoes 7; labelled: hats 5, shoes 10 -> (5*5 + 7*10) / 15^2
    assert result.chance == pytest.approx((5 * 5 + 7 * 10) / 225)


def test_nearest_is_by_cosine_not_by_dot_product_and_ignores_lengths() -> None:
    # The bags prompt's vector is ten times longer: by dot product every image would be "bags".
    class_vectors = CLASS_VECTORS * np.array([[10.0], [1.0], [1.0]], np.float32)
    image = np.array([0.6, 0.0, 0.8, 0.0], np.float32)  # cosine 0.6 with bags, 0.8 with shoes
    labels = ["shoes", "shoes", "bags"]
    vectors = np.stack([image, image * 1000, np.array([0.8, 0.0, 0.6, 0.0], np.float32)])

    result = zero_shot_agreement(vectors, class_vectors, CLASSES, labels, weights_are_random=False)

    assert result.agreement == 1.0


def test_a_collapsed_model_that_names_one_class_for_every_image_scores_exactly_chance() -> None:
    labels = ["bags"] * 6 + ["hats"] * 3 + ["shoes"] * 1
    vectors = np.stack([_towards(1, off=float(n)) for n in range(10)])  # every image nearest hats

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=True)

    assert result.agreement == pytest.approx(0.3) and result.chance == pytest.approx(0.3)
    assert result.caveat == NOISE_LABEL == "noise: random weights"
    assert result.metadata() == {
        "zero_shot_classes": 3,
        "zero_shot_scored": 10,
        "zero_shot_agreement": 0.3,
        "zero_shot_agreement_chance": 0.3,
        "zero_shot_caveat": "noise: random weights",
    }
    assert result.markdown_row() == "| zero-shot agreement, 3 prompts | 0.300 (chance 0.300) (noise: random weights) |"


def test_images_without_a_direction_a_label_or_a_prompt_are_left_out_and_counted() -> None:
    labels = pa.array(["shoes", None, "boots", "hats", "shoes"])
    vectors = np.stack([_towards(2), _towards(1), _towards(2), _towards(0), np.zeros(4, np.float32)])
    vectors[3, 0] = np.nan

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=False)

    assert (result.agreement, result.chance, result.scored, result.left_out) == (1.0, 1.0, 1, 4)
    assert result.notes == (
        "2 vectors not finite or of zero length: left out",
        "1 vectors without a label: left out",
        "1 vectors whose label has no prompt: left out",
    )


def test_one_class_or_nothing_to_score_gives_no_agreement() -> None:
    one = zero_shot_agreement(np.stack([_towards(0)]), CLASS_VECTORS[:1], ["bags"], ["bags"], weights_are_random=False)
    assert (one.agreement, one.chance) == (None, None) and "needs two classes" in one.notes[0]
    none = zero_shot_agreement(np.stack([_towards(0)]), CLASS_VECTORS, CLASSES, [None], weights_are_random=False)
    assert none.agreement is None and "needs an image" in none.notes[-1]


def test_class_vectors_that_do_not_fit_are_refused() -> None:
    vectors, labels = np.stack([_towards(0)]), ["bags"]
    with pytest.raises(ValueError, match=r"one class vector per class, \(3, 4\), got shape \(2, 4\)"):
        zero_shot_agreement(vectors, CLASS_VECTORS[:2], CLASSES, labels, weights_are_random=False)
    with pytest.raises(ValueError, match=r"got shape \(3, 3\)"):
        zero_shot_agreement(vectors, CLASS_VECTORS[:, :3], CLASSES, labels, weights_are_random=False)
    with pytest.raises(ValueError, match="a class is given twice: \\['bags'\\]"):
        zero_shot_agreement(vectors, CLASS_VECTORS, ["bags", "bags", "hats"], labels, weights_are_random=False)
    with pytest.raises(ValueError, match="no direction"):
        zero_shot_agreement(vectors, CLASS_VECTORS * 0, CLASSES, labels, weights_are_random=False)
    with pytest.raises(ValueError, match="expected 2 image vectors"):
        zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, ["bags", "hats"], weights_are_random=False)


def test_prompts_are_one_per_distinct_label_from_the_template() -> None:
    assert ZERO_SHOT_PROMPT_TEMPLATE == "a photo of a {value}"
    assert zero_shot_prompts(pa.chunked_array([["shoes", None], ["bags", "shoes"]])) == {
        "bags": "a photo of a bags",
        "shoes": "a photo of a shoes",
    }
    assert zero_shot_prompts([3, 1, 3], template="product {value}, {value}") == {
        "1": "product 1, 1",
        "3": "product 3, 3",
    }
    for template in ("a photo", "{value} of {kind}", "{value} }"):
        with pytest.raises(ValueError, match="template"):
            zero_shot_prompts([], template=template)


def test_the_evaluation_shows_the_zero_shot_score_beside_knn_agreement() -> None:
    labels = ["bags", "hats", "shoes"] * 4
    vectors = np.stack([_towards(CLASSES.index(label), off=0.01 * n) for n, label in enumerate(labels)])
    evaluation = evaluate_embeddings(vectors, labels, weights_are_random=True)
    assert "zero-shot" not in evaluation.markdown() and "zero_shot_agreement" not in evaluation.metadata()

    zero_shot = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=True)
    shown = dataclasses.replace(evaluation, zero_shot=zero_shot)

    lines = shown.markdown().splitlines()
    knn = next(n for n, line in enumerate(lines) if line.startswith("| kNN agreement"))
    assert lines[knn + 1] == "| zero-shot agreement, 3 prompts | 1.000 (chance 0.333) (noise: random weights) |"
    assert shown.metadata()["zero_shot_agreement"] == 1.0 and shown.metadata()["zero_shot_caveat"] == NOISE_LABEL

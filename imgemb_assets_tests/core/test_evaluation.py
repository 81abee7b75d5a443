"""Embedding evaluation on synthetic vectors whose label structure is known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from imgemb_assets.core.evaluation.scores import (
    RANDOM_WEIGHTS_WARNING,
    EvaluationSettings,
    evaluate_embeddings,
)

WIDTH = 128
LABELS = ("shoes", "bags", "shirts", "hats", "watches")


def _clustered(rng: np.random.Generator, per_label: int, spread: float = 0.05) -> tuple[np.ndarray, list[str]]:
    """Each label a tight cloud around its own non-negative centre (cosine between centres ~0.64)."""
    centres = np.abs(rng.normal(size=(len(LABELS), WIDTH)))
    labels = [LABELS[n % len(LABELS)] for n in range(per_label * len(LABELS))]
    vectors = np.array([centres[n % len(LABELS)] for n in range(len(labels))])
    vectors += rng.normal(scale=spread, size=vectors.shape)
    return vectors.astype(np.float32), labels


def test_tight_clusters_by_label_score_near_one() -> None:
    vectors, labels = _clustered(np.random.default_rng(0), per_label=60)
    result = evaluate_embeddings(vectors, labels, weights_are_random=False)
    assert result.silhouette is not None and result.silhouette > 0.9
    assert result.knn_agreement == pytest.approx(1.0)
    # Five equal labels: a random neighbour shares the label with probability 59/299.
    assert result.knn_agreement_chance == pytest.approx(59 / 299)
    assert (result.labelled_sampled, result.labels, result.notes) == (300, 5, ())


def test_shuffled_labels_score_near_zero_and_chance() -> None:
    rng = np.random.default_rng(1)
    vectors, labels = _clustered(rng, per_label=60)
    shuffled = [labels[n] for n in rng.permutation(len(labels))]
    result = evaluate_embeddings(vectors, shuffled, weights_are_random=False)
    assert result.silhouette is not None and abs(result.silhouette) < 0.1
    assert result.knn_agreement is not None and result.knn_agreement_chance is not None
    assert abs(result.knn_agreement - result.knn_agreement_chance) < 0.06


def test_the_similarity_distribution_of_few_vectors_covers_every_pair() -> None:
    rng = np.random.default_rng(2)
    vectors, labels = _clustered(rng, per_label=8)  # 40 vectors: 780 pairs, under the pair sample
    result = evaluate_embeddings(vectors, labels, weights_are_random=False)
    unit = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    every_pair = (unit @ unit.T)[np.triu_indices(40, k=1)]
    assert result.pairs_sampled == 780 == sum(result.histogram_counts)
    assert result.similarity_quantiles[0.5] == pytest.approx(float(np.median(every_pair)))
    assert result.histogram_edges[0] == pytest.approx(every_pair.min())
    assert result.histogram_edges[-1] == pytest.approx(every_pair.max())
    # Tight clusters: 140 pairs inside a label near 1, 640 across labels near 0.64.
    assert result.histogram_counts[-1] == 140


def test_large_inputs_are_sampled_to_the_bounds_and_repeat_exactly() -> None:
    vectors, labels = _clustered(np.random.default_rng(3), per_label=400)
    settings = EvaluationSettings(sample_size=300, pair_sample_size=5_000, seed=7)
    first = evaluate_embeddings(vectors, labels, weights_are_random=False, settings=settings)
    again = evaluate_embeddings(vectors, labels, weights_are_random=False, settings=settings)
    assert (first.labelled_sampled, first.pairs_sampled) == (300, 5_000)
    assert first == again
    assert "random sample of 300 of 2000" in first.markdown()


def test_one_label_gives_no_label_scores_but_still_the_distribution() -> None:
    vectors, _ = _clustered(np.random.default_rng(4), per_label=10)
    result = evaluate_embeddings(vectors, ["shoes"] * len(vectors), weights_are_random=False)
    assert result.silhouette is None and result.knn_agreement is None
    assert any("two labels" in note for note in result.notes)
    assert result.pairs_sampled == 50 * 49 // 2
    assert "silhouette" not in result.metadata() and "similarity_p50" in result.metadata()


def test_a_label_with_one_member_is_left_out_of_the_scores_not_the_neighbours() -> None:
    vectors, labels = _clustered(np.random.default_rng(5), per_label=30)
    labels[0] = "umbrellas"  # alone, sitting inside the shoes cluster
    result = evaluate_embeddings(vectors, labels, weights_are_random=False)
    assert result.singleton_labels == 1
    assert result.silhouette is not None and result.silhouette > 0.9
    # The lone vector is still a candidate neighbour: the shoes near it lose a little agreement.
    assert result.knn_agreement is not None and 0.98 < result.knn_agreement < 1.0


def test_missing_labels_and_broken_vectors_are_left_out_and_counted() -> None:
    vectors, labels = _clustered(np.random.default_rng(6), per_label=20)
    with_gaps: list[str | None] = list(labels)
    with_gaps[3] = with_gaps[8] = None
    vectors[5] = np.nan
    vectors[6] = 0.0
    result = evaluate_embeddings(vectors, pa.array(with_gaps), weights_are_random=False)
    assert (result.invalid_vectors, result.unlabelled_vectors, result.labelled_sampled) == (2, 2, 96)
    assert result.pairs_sampled == 98 * 97 // 2  # the unlabelled still count here
    assert result.silhouette is not None and result.silhouette > 0.9
    assert np.isfinite(list(result.similarity_quantiles.values())).all()


def test_fewer_vectors_than_k_give_no_agreement() -> None:
    vectors, labels = _clustered(np.random.default_rng(7), per_label=2)  # 10 vectors
    result = evaluate_embeddings(vectors, labels, weights_are_random=False, settings=EvaluationSettings(k=10))
    assert result.knn_agreement is None
    assert any("more than k=10" in note for note in result.notes)
    assert result.silhouette is not None
    with pytest.raises(ValueError, match="k must"):
        evaluate_embeddings(vectors, labels, weights_are_random=False, settings=EvaluationSettings(k=0))
    with pytest.raises(ValueError, match="vectors"):
        evaluate_embeddings(vectors, labels[:5], weights_are_random=False)


def test_random_weights_are_flagged_in_plain_words() -> None:
    vectors, labels = _clustered(np.random.default_rng(8), per_label=20)
    flagged = evaluate_embeddings(vectors, labels, weights_are_random=True)
    trained = evaluate_embeddings(vectors, labels, weights_are_random=False)
    assert flagged.markdown().startswith(f"**Warning:** {RANDOM_WEIGHTS_WARNING}")
    assert flagged.metadata()["warning"] == RANDOM_WEIGHTS_WARNING
    assert flagged.metadata()["weights_are_random"] is True
    assert "warning" not in trained.metadata() and "random, untrained" not in trained.markdown()


def test_metadata_is_plain_values_and_the_markdown_stays_small() -> None:
    vectors, labels = _clustered(np.random.default_rng(9), per_label=500)
    with_gaps: list[str | None] = list(labels)
    with_gaps[0] = None
    with_gaps[1] = "umbrellas"
    vectors[2] = np.nan
    # Every note at once, the warning and the histogram: the largest markdown there is.
    result = evaluate_embeddings(vectors, with_gaps, weights_are_random=True)
    metadata = result.metadata()
    assert all(type(value) in (bool, int, float, str) for value in metadata.values())
    markdown = metadata["summary"]
    assert isinstance(markdown, str) and "```" in markdown and "<" not in markdown
    assert len(result.notes) == 4
    assert len(markdown.encode()) < 2048
    # Every bar at full width, as a flat distribution would draw it: still under 2 KB.
    flat = dataclasses.replace(result, histogram_counts=(1000,) * len(result.histogram_counts))
    assert len(flat.markdown().encode()) < 2048

"""How well embeddings separate known labels (e.g. the sales table's `category`).

The article's quantitative evaluation, on bounded samples so it stays cheap:
- silhouette score, cosine metric (scikit-learn): near 1 when each label is a
  tight cluster far from the others, near 0 when labels do not follow the space;
- kNN label agreement: the share of each vector's k nearest neighbours (cosine)
  with its own label, next to the share random labels would give (chance);
- pairwise cosine similarities of random pairs: quantiles and a histogram;
- zero-shot agreement, for a model with a text tower paired with its image
  tower (CLIP): the share of images whose nearest class prompt ("a photo of a
  {value}", one per label value, encoded by the text tower) is their own label,
  next to the share shuffled labels would give (`zero_shot_agreement`). This
  module has no model: `evaluate_partition` takes the encoded prompts per
  model_id from a `ZeroShotSource` (`zero_shot.StepZeroShot` builds them with
  the text tower) and sets `EmbeddingEvaluation.zero_shot`, which the markdown
  and metadata then show.

Rules for awkward inputs, so every result says what it measured:
- vectors that are not finite or have zero length (no direction) are left out;
- rows without a label (null) are left out of the two label scores, not of the
  similarity distribution;
- a label with a single member in the sample cannot agree with anyone: its
  vectors are no queries of the kNN score and not in the silhouette, but stay
  candidate neighbours;
- with fewer than two labels, or no more vectors than k, a score is None and
  the notes say why.
Scores of a model with random weights are computed like any others, and marked
meaningless when the caller says the weights are random.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from imgemb_assets.core.embedding.model_settings import model_id_has_random_weights
from imgemb_assets.core.evaluation.rows import ROWS_AT_ONCE, row_norms, shown
from imgemb_assets.core.evaluation.zero_shot_agreement import ZeroShotAgreement, ZeroShotSource, zero_shot_agreement
from imgemb_assets.core.lake.embedding_column import vectors_of
from imgemb_assets.core.lake.tables import EMBEDDING_EVALUATION_SCHEMA, PARTITION_COLUMN

RANDOM_WEIGHTS_WARNING: Final = (
    "These embeddings come from a model with random, untrained weights. "
    "The scores below describe noise, not the images: do not use them to judge the embeddings."
)
QUANTILES: Final = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass(frozen=True)
class EvaluationSettings:
    # Neighbours per vector for the agreement score; 10 is common in retrieval
    # evaluations and small next to any label of a catalogue worth scoring.
    k: int = 10
    # Labelled vectors sampled for the silhouette and kNN scores: both cost about
    # sample_size^2 x width multiply-adds, ~8 G at 2000 x 2048, about a second on a CPU.
    sample_size: int = 2000
    # Random pairs for the similarity distribution: enough for the 1% quantiles to be
    # stable to about 0.01, and cheap (one dot product each).
    pair_sample_size: int = 20_000
    histogram_bins: int = 12
    seed: int = 0


@dataclass(frozen=True)
class EmbeddingEvaluation:
    weights_are_random: bool
    vectors: int  # vectors given
    invalid_vectors: int  # not finite, or zero length: left out of everything
    unlabelled_vectors: int  # valid, but the label is null: left out of the label scores
    labelled_sampled: int  # labelled vectors the two label scores were computed on
    labels: int  # distinct labels in that sample
    singleton_labels: int  # labels with a single member in that sample
    silhouette: float | None
    k: int
    knn_agreement: float | None
    knn_agreement_chance: float | None  # expected agreement were the labels shuffled
    pairs_sampled: int
    similarity_quantiles: dict[float, float]
    histogram_counts: tuple[int, ...]
    histogram_edges: tuple[float, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Set by the caller for a model with a text tower (`zero_shot_agreement`); shown beside the kNN score.
    zero_shot: ZeroShotAgreement | None = None

    def markdown(self) -> str:
        lines = [f"**Warning:** {RANDOM_WEIGHTS_WARNING}", ""] if self.weights_are_random else []
        lines += [
            "| score | value |",
            "|---|---|",
            f"| silhouette (cosine) | {shown(self.silhouette)} |",
            f"| kNN agreement, k={self.k} | {shown(self.knn_agreement)} (chance {shown(self.knn_agreement_chance)}) |",
            *([self.zero_shot.markdown_row()] if self.zero_shot is not None else []),
            f"| labelled vectors sampled / labels | {self.labelled_sampled} / {self.labels} |",
        ]
        if self.similarity_quantiles:
            quantiles = ", ".join(f"p{q * 100:g} {v:.3f}" for q, v in self.similarity_quantiles.items())
            lines += ["", f"Cosine similarity of {self.pairs_sampled} random pairs: {quantiles}", ""]
            lines += ["```", *_histogram_lines(self.histogram_counts, self.histogram_edges), "```"]
        notes = [*self.notes, *(f"zero-shot: {note}" for note in (self.zero_shot.notes if self.zero_shot else ()))]
        lines += ([""] + [f"- {note}" for note in notes]) if notes else []
        return "\n".join(lines)

    def metadata(self) -> dict[str, float | int | str]:
        """Plain values for asset or check metadata; a score that was not computed is left out."""
        values: dict[str, float | int | str] = {
            "weights_are_random": self.weights_are_random,
            "vectors": self.vectors,
            "invalid_vectors": self.invalid_vectors,
            "unlabelled_vectors": self.unlabelled_vectors,
            "labelled_sampled": self.labelled_sampled,
            "labels": self.labels,
            "singleton_labels": self.singleton_labels,
            "k": self.k,
            "pairs_sampled": self.pairs_sampled,
        }
        scores = {
            "silhouette": self.silhouette,
            "knn_agreement": self.knn_agreement,
            "knn_agreement_chance": self.knn_agreement_chance,
        }
        values |= {name: round(value, 4) for name, value in scores.items() if value is not None}
        values |= {f"similarity_p{q * 100:g}": round(v, 4) for q, v in self.similarity_quantiles.items()}
        if self.zero_shot is not None:
            values |= self.zero_shot.metadata()
        if self.weights_are_random:
            values["warning"] = RANDOM_WEIGHTS_WARNING
        values["summary"] = self.markdown()
        return values


def evaluate_embeddings(
    vectors: np.ndarray,
    labels: Sequence[object | None] | pa.Array | pa.ChunkedArray,
    *,
    weights_are_random: bool,
    settings: EvaluationSettings = EvaluationSettings(),
) -> EmbeddingEvaluation:
    """Scores of `vectors` (N, width) against `labels` (N values, null for unknown)."""
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        labels = labels.to_pylist()  # Arrow nulls become None
    if vectors.ndim != 2 or vectors.shape[0] != len(labels):
        raise ValueError(f"expected {len(labels)} vectors in an (N, width) array, got shape {vectors.shape}")
    if settings.k < 1:
        raise ValueError(f"k must be at least 1, got {settings.k}")
    rng = np.random.default_rng(settings.seed)
    norms = row_norms(vectors)
    # Not finite (a NaN or inf gives a NaN or inf norm) or no direction: no cosine.
    valid_rows = np.flatnonzero(np.isfinite(norms) & (norms > 0))
    similarities = _random_pair_similarities(vectors, norms, valid_rows, settings.pair_sample_size, rng)
    counts, edges = _histogram(similarities, settings.histogram_bins)

    notes: list[str] = []
    labelled_rows = np.array([row for row in valid_rows.tolist() if labels[row] is not None], dtype=np.int64)
    sampled_rows = _sample_rows(labelled_rows, settings.sample_size, rng, notes)
    # Unit rows: float32 halves scikit-learn's work, and unit length keeps any input within its range.
    sample = (vectors[sampled_rows] / norms[sampled_rows, None]).astype(np.float32)
    sample_labels = np.array([str(labels[row]) for row in sampled_rows], dtype=object)
    members = Counter(sample_labels.tolist())
    in_a_group = np.array([members[label] >= 2 for label in sample_labels], dtype=bool)
    singletons = sum(1 for count in members.values() if count == 1)
    if singletons:
        notes.append(f"{singletons} labels have one member: left out of the silhouette and as kNN queries")
    silhouette = _silhouette(sample[in_a_group], sample_labels[in_a_group], notes)
    agreement, chance = _knn_agreement(sample, sample_labels, in_a_group, settings.k, notes)

    invalid, unlabelled = len(vectors) - len(valid_rows), len(valid_rows) - len(labelled_rows)
    if invalid:
        notes.append(f"{invalid} vectors not finite or of zero length: left out")
    if unlabelled:
        notes.append(f"{unlabelled} vectors without a label: left out of the label scores")
    return EmbeddingEvaluation(
        weights_are_random=weights_are_random,
        vectors=len(vectors),
        invalid_vectors=invalid,
        unlabelled_vectors=unlabelled,
        labelled_sampled=len(sampled_rows),
        labels=len(members),
        singleton_labels=singletons,
        silhouette=silhouette,
        k=settings.k,
        knn_agreement=agreement,
        knn_agreement_chance=chance,
        pairs_sampled=len(similarities),
        similarity_quantiles=_quantiles(similarities),
        histogram_counts=tuple(int(c) for c in counts),
        histogram_edges=tuple(float(e) for e in edges),
        notes=tuple(notes),
    )


def _sample_rows(rows: np.ndarray, size: int, rng: np.random.Generator, notes: list[str]) -> np.ndarray:
    if len(rows) <= size:
        return rows
    notes.append(f"label scores on a random sample of {size} of {len(rows)} labelled vectors")
    return np.sort(rng.choice(rows, size=size, replace=False))


def _quantiles(similarities: np.ndarray) -> dict[float, float]:
    if not len(similarities):
        return {}
    return {q: float(v) for q, v in zip(QUANTILES, np.quantile(similarities, QUANTILES))}


def _random_pair_similarities(
    vectors: np.ndarray, norms: np.ndarray, rows: np.ndarray, pairs: int, rng: np.random.Generator
) -> np.ndarray:
    """Cosine of random pairs of distinct `rows`; all pairs when there are fewer than asked."""
    n = len(rows)
    if n < 2:
        return np.empty(0)
    if n * (n - 1) // 2 <= pairs:
        first, second = np.triu_indices(n, k=1)
    else:
        # Drawn with replacement: at this many vectors repeats are rare and harmless.
        first = rng.integers(0, n, size=pairs)
        second = (first + rng.integers(1, n, size=pairs)) % n  # never the same vector
    first, second = rows[first], rows[second]
    similarities = np.empty(len(first))
    for start in range(0, len(first), ROWS_AT_ONCE):  # bounded copies of the paired rows
        a, b = first[start : start + ROWS_AT_ONCE], second[start : start + ROWS_AT_ONCE]
        dots = np.einsum("ij,ij->i", vectors[a].astype(np.float64), vectors[b].astype(np.float64))
        similarities[start : start + ROWS_AT_ONCE] = dots / (norms[a] * norms[b])
    return similarities


def _histogram(similarities: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    if not len(similarities):
        return np.zeros(0, dtype=int), np.zeros(0)
    # Bins over the observed range: ReLU features fill only part of [-1, 1].
    low, high = float(similarities.min()), float(similarities.max())
    return np.histogram(similarities, bins=bins, range=(low, high if high > low else low + 1e-6))


def _silhouette(sample: np.ndarray, sample_labels: np.ndarray, notes: list[str]) -> float | None:
    if len(set(sample_labels.tolist())) < 2:
        notes.append("silhouette needs two labels with two members each: not computed")
        return None
    return float(silhouette_score(sample, sample_labels, metric="cosine"))


def _knn_agreement(
    sample: np.ndarray, sample_labels: np.ndarray, queries: np.ndarray, k: int, notes: list[str]
) -> tuple[float | None, float | None]:
    """Mean share of a query's k nearest others with its label, and that share under shuffled labels."""
    if len(set(sample_labels.tolist())) < 2:
        notes.append("kNN agreement needs two labels (with one, every neighbour agrees): not computed")
        return None, None
    if len(sample) <= k:
        notes.append(f"kNN agreement needs more than k={k} labelled vectors, has {len(sample)}: not computed")
        return None, None
    if not queries.any():
        notes.append("kNN agreement needs a label with two members: not computed")
        return None, None
    search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(sample)
    # Without query points, kneighbors leaves each point out of its own neighbours.
    neighbours = search.kneighbors(return_distance=False)[queries]
    agreement = float((sample_labels[neighbours] == sample_labels[queries][:, None]).mean())
    # Shuffled labels: a neighbour shares the query's label with probability
    # (members - 1) / (n - 1), averaged over the queries.
    members = Counter(sample_labels.tolist())
    chance = float(np.mean([(members[label] - 1) / (len(sample) - 1) for label in sample_labels[queries]]))
    return agreement, chance


# 20 blocks of 3 UTF-8 bytes: with 12 bins the chart stays near 1 KB.
_BAR_WIDTH: Final = 20
# Eighths of a character cell, for bars finer than whole blocks.
_BAR_EIGHTHS: Final = " ▏▎▍▌▋▊▉"


def _histogram_lines(counts: Sequence[int], edges: Sequence[float]) -> list[str]:
    """A text bar chart, one bin a line: the Dagster UI shows it without images or HTML."""
    if not counts:
        return []
    largest = max(counts)
    lines = []
    for count, low, high in zip(counts, edges, edges[1:]):
        eighths = round(_BAR_WIDTH * 8 * count / largest) if largest else 0
        eighths = max(eighths, 1) if count else 0  # a bin with members never looks empty
        bar = "█" * (eighths // 8) + (_BAR_EIGHTHS[eighths % 8] if eighths % 8 else "")
        lines.append(f"{low:6.3f}-{high:6.3f} {bar:<{_BAR_WIDTH}} {count}")
    return lines


@dataclass(frozen=True)
class PartitionEvaluation:
    """One partition's evaluation per model: rows of EMBEDDING_EVALUATION_SCHEMA, and each model's result.

    zero_shot_skipped: model_id -> why its vectors got no zero-shot score, for a model that could have one.
    """

    table: pa.Table
    by_model: dict[str, EmbeddingEvaluation]
    zero_shot_skipped: dict[str, str] = field(default_factory=dict)


def evaluate_partition(
    embeddings: pa.Table,
    prefix: str,
    label_column: str | None,
    settings: EvaluationSettings = EvaluationSettings(),
    zero_shot: ZeroShotSource | None = None,
) -> PartitionEvaluation:
    """Each model's vectors of one partition (`model_id`, `embedding` and the label column if present), scored
    apart: vectors of two models are never compared. Without the label column, only the similarity distribution.

    With `zero_shot` and the label column, each model's vectors are also labelled by the nearest class prompt
    of the class vectors `zero_shot(model_id)` gives (`zero_shot_agreement`); a reason it gives instead is
    kept in `zero_shot_skipped` and in that model's notes.
    """
    has_labels = label_column is not None and label_column in embeddings.column_names
    results: dict[str, EmbeddingEvaluation] = {}
    skipped: dict[str, str] = {}
    for model_id in sorted(set(embeddings.column("model_id").to_pylist())):
        rows = embeddings.filter(pc.equal(embeddings.column("model_id"), model_id))
        labels = rows.column(label_column) if has_labels else [None] * rows.num_rows
        vectors = vectors_of(rows.column("embedding"))
        weights_are_random = model_id_has_random_weights(model_id)
        result = evaluate_embeddings(vectors, labels, weights_are_random=weights_are_random, settings=settings)
        classes = zero_shot(model_id) if zero_shot is not None and has_labels else None
        if isinstance(classes, str):
            skipped[model_id] = classes
            result = replace(result, notes=(*result.notes, f"zero-shot not scored: {classes}"))
        elif classes is not None:
            scored = zero_shot_agreement(
                vectors, classes.vectors, classes.classes, labels, weights_are_random=weights_are_random
            )
            result = replace(result, zero_shot=scored)
        results[model_id] = result
    table = pa.Table.from_pylist(
        [_evaluation_row(prefix, model_id, label_column if has_labels else None, result)
         for model_id, result in results.items()],
        schema=EMBEDDING_EVALUATION_SCHEMA,
    )  # fmt: skip
    return PartitionEvaluation(table, results, skipped)


def _evaluation_row(
    prefix: str, model_id: str, label_column: str | None, result: EmbeddingEvaluation
) -> dict[str, object]:
    quantiles = result.similarity_quantiles
    zero_shot = result.zero_shot
    return {
        PARTITION_COLUMN: prefix,
        "model_id": model_id,
        "label_column": label_column,
        "weights_are_random": result.weights_are_random,
        "vectors": result.vectors,
        "labelled_sampled": result.labelled_sampled,
        "labels": result.labels,
        "silhouette": result.silhouette,
        "knn_agreement": result.knn_agreement,
        "knn_agreement_chance": result.knn_agreement_chance,
        "similarity_p5": quantiles.get(0.05),
        "similarity_p50": quantiles.get(0.5),
        "similarity_p95": quantiles.get(0.95),
        "zero_shot_agreement": zero_shot.agreement if zero_shot else None,
        "zero_shot_agreement_chance": zero_shot.chance if zero_shot else None,
        "zero_shot_classes": zero_shot.classes if zero_shot else None,
    }

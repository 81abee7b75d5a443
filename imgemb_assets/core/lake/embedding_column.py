"""The embedding column's Arrow type, and its conversions to and from numpy, in one place."""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa

# Delta has no fixed-size list: vectors are stored as list<float32>, width checked on write.
EMBEDDING_TYPE: Final = pa.list_(pa.float32())


def embedding_array(vectors: np.ndarray) -> pa.Array:
    """(N, width) float32 -> an embedding column."""
    width = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(EMBEDDING_TYPE)


def vectors_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An embedding column of equal-width vectors as an (N, width) array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = len(array[0])
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)

"""Generated prefixes through the core: whatever first path segment S3 or a local folder holds, it either becomes a
partition (listed, fingerprinted, written to Delta and read back, the other partitions untouched) or is refused by
name with its reason. Nothing in between: no crash, no partition that stands for something else."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imgemb_assets.core.ingest.discovery import DiscoveryCursor, plan_discovery
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import RAW_IMAGE_MANIFEST, REJECTED_IMAGES, REJECTED_IMAGES_SCHEMA
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_assets.core.storage.names import partition_key_problem, shown_name

# An S3 key is at most 1024 bytes of UTF-8: the prefix, '/', and an object name.
MAX_PREFIX_BYTES = 1000
# The longest name a local file system takes.
MAX_NAME_BYTES = 255
OTHER = "2026-11-01"  # a partition beside the generated one, which must stay as it is

_ANY_CHARACTER = st.characters(exclude_categories=("Cs",))  # S3 keys are UTF-8: no lone surrogates
_AWKWARD = st.sampled_from(
    [
        "", " ", " lead", "trail ", ".", "..", "...", "a...b", "it's", 'say "hi"', "x' OR '1'='1", "line\nbreak",
        "tab\t", "\x00", "\x7f", "\x1b[31m", "ж" * 51, "é" * 500, "100%", "a+b=c", "café ☕", "a~b", "_~0",
        "prefix_partition", "CON", "~",
    ]
)  # fmt: skip
PREFIXES = (
    st.one_of(
        _AWKWARD,
        st.text(_ANY_CHARACTER, max_size=40),
        st.text(st.sampled_from("ab .'\"~%_-\u00e9\u0436\u2615/"), max_size=80),
        st.text(_ANY_CHARACTER, min_size=100, max_size=MAX_PREFIX_BYTES),
    )
    .map(lambda text: text.replace("/", "_"))
    .filter(lambda text: len(text.encode()) <= MAX_PREFIX_BYTES)
)
# What a local folder may be called: any bytes but '/' and NUL, UTF-8 or not.
LOCAL_NAMES = st.one_of(
    PREFIXES.map(lambda text: text.replace("\x00", "")),
    st.binary(min_size=1, max_size=60).map(lambda raw: os.fsdecode(raw.replace(b"/", b"_").replace(b"\x00", b"_"))),
).filter(lambda name: name not in ("", ".", "..") and len(os.fsencode(name)) <= MAX_NAME_BYTES)

_FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rows(prefix: str, ids: list[str]) -> pa.Table:
    return pa.table(
        {"image_id": ids, "prefix": [prefix] * len(ids), "uri": ids, "reason": ["r"] * len(ids)}
        | {"etag": [None] * len(ids), "decoded_with": [None] * len(ids)},
        schema=REJECTED_IMAGES_SCHEMA,
    )


def _ids_by_prefix(lake: Lake) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in lake.read(REJECTED_IMAGES).to_pylist():
        out.setdefault(row["prefix"], []).append(row["image_id"])
    return {prefix: sorted(ids) for prefix, ids in out.items()}


@_FAST
@given(prefix=PREFIXES)
def test_any_prefix_is_a_delta_partition_that_round_trips_or_a_named_rejection(prefix: str) -> None:
    assume(prefix != OTHER)
    with tempfile.TemporaryDirectory(prefix="imgemb-prop-") as lake_root:
        lake = Lake(lake_root)
        lake.write_partition(REJECTED_IMAGES, _rows(OTHER, ["kept"]), OTHER)
        if not prefix:
            with pytest.raises(LakeError, match="empty prefix"):
                lake.write_partition(REJECTED_IMAGES, _rows(prefix, ["1"]), prefix)
            assert _ids_by_prefix(lake) == {OTHER: ["kept"]}
            return
        lake.write_partition(REJECTED_IMAGES, _rows(prefix, ["1", "2"]), prefix)
        lake.write_partition(REJECTED_IMAGES, _rows(prefix, ["3"]), prefix)  # replaces, never appends
        assert lake.read(REJECTED_IMAGES, prefix).to_pylist() == _rows(prefix, ["3"]).to_pylist()
        assert _ids_by_prefix(lake) == {OTHER: ["kept"], prefix: ["3"]}
        assert lake.partition_keys(REJECTED_IMAGES) == sorted([OTHER, prefix])


@_FAST
@given(name=LOCAL_NAMES)
def test_any_folder_name_is_a_partition_or_refused_by_name_with_its_reason(name: str) -> None:
    assume(name != OTHER)
    with tempfile.TemporaryDirectory(prefix="imgemb-prop-") as scratch:
        root = Path(scratch) / "raw"
        for folder in (name, OTHER):
            (root / folder).mkdir(parents=True)
            (root / folder / "a.jpg").write_bytes(folder.encode("utf-8", "surrogateescape"))
        store = LocalObjectStore(root)
        plan = plan_discovery(store, DiscoveryCursor(), recent=3)
        assert DiscoveryCursor.from_json(plan.cursor.to_json()) == plan.cursor
        problem = partition_key_problem(name)
        if problem is not None:
            assert plan.new_prefixes == [OTHER]
            assert plan.refused_prefixes == {shown_name(name): problem}
            return
        assert plan.new_prefixes == sorted([name, OTHER]) and plan.refused_prefixes == {}
        assert sorted(plan.changed) == sorted([name, OTHER])
        (listed,) = store.list_objects(name)
        assert listed.key == f"{name}/a.jpg"
        assert store.read_bytes(listed.uri) == name.encode()
        lake = Lake(str(Path(scratch) / "lake"))
        for prefix in (OTHER, name):
            lake.write_partition(RAW_IMAGE_MANIFEST, build_manifest(store.list_objects(prefix), prefix), prefix)
        assert lake.read(RAW_IMAGE_MANIFEST, name).column("uri").to_pylist() == [listed.uri]
        assert lake.partition_keys(RAW_IMAGE_MANIFEST) == sorted([name, OTHER])

"""The embedding domain's definitions: the `image_embeddings` asset, on the GPU the settings request."""

from collections.abc import Mapping
from typing import Any

from dagster import Definitions

from imgemb_assets.dagster_wiring.embedding.assets import build_embedding_asset
from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.location.placement import gpu_step_tags
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_embedding_defs(settings: LocationSettings, resources: Mapping[str, Any]) -> Definitions:
    """Its code version is the `embedding_model` resource's, so partitions embedded with other weights show stale."""
    model_code_version = resources["embedding_model"].code_version()
    return Definitions(
        assets=[build_embedding_asset(prefix_backfill_policy(settings), gpu_step_tags(settings), model_code_version)]
    )

"""The embedding domain's definitions: the `image_embeddings` asset, on the GPU the settings request."""

import dagster as dg

from imgemb_assets.dagster_wiring.embedding.assets import build_embedding_asset
from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.location.placement import gpu_step_tags
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_embedding_defs(settings: LocationSettings, model_code_version: str) -> dg.Definitions:
    """`model_code_version`: the embedding_model resource's, so partitions embedded with other weights show stale."""
    return dg.Definitions(
        assets=[build_embedding_asset(prefix_backfill_policy(settings), gpu_step_tags(settings), model_code_version)]
    )

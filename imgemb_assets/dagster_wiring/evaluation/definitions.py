"""The evaluation domain's definitions: the `embedding_evaluation` asset."""

import dagster as dg

from imgemb_assets.dagster_wiring.evaluation.assets import build_evaluation_asset
from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_evaluation_defs(settings: LocationSettings, model_code_version: str) -> dg.Definitions:
    return dg.Definitions(assets=[build_evaluation_asset(prefix_backfill_policy(settings), model_code_version)])

"""The search domain's definitions: the search index with the near-duplicate table, and their job."""

import dagster as dg

from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.search.assets import build_similarity_assets
from imgemb_assets.dagster_wiring.search.jobs import search_index_job


def build_search_defs(settings: LocationSettings, model_code_version: str) -> dg.Definitions:
    return dg.Definitions(assets=[build_similarity_assets(model_code_version)], jobs=[search_index_job])

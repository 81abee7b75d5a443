"""The search domain's definitions: the search index with the near-duplicate table, and their job."""

from collections.abc import Mapping
from typing import Any

from dagster import Definitions

from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.search.assets import build_similarity_assets
from imgemb_assets.dagster_wiring.search.jobs import search_index_job


def build_search_defs(settings: LocationSettings, resources: Mapping[str, Any]) -> Definitions:
    model_code_version = resources["embedding_model"].code_version()
    return Definitions(assets=[build_similarity_assets(model_code_version)], jobs=[search_index_job])

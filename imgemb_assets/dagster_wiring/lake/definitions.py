"""The lake domain's definitions: the maintenance schedule, which brings its job (launchable by hand while it is off)."""

from collections.abc import Mapping
from typing import Any

from dagster import Definitions

from imgemb_assets.dagster_wiring.lake.maintenance import build_maintenance_schedule
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_lake_defs(settings: LocationSettings, resources: Mapping[str, Any]) -> Definitions:
    return Definitions(schedules=[build_maintenance_schedule(settings)])

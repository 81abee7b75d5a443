"""The lake domain's definitions: the maintenance schedule, which brings its job (launchable by hand while it is off)."""

import dagster as dg

from imgemb_assets.dagster_wiring.lake.maintenance import build_maintenance_schedule
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_lake_defs(settings: LocationSettings, model_code_version: str) -> dg.Definitions:
    return dg.Definitions(schedules=[build_maintenance_schedule(settings)])

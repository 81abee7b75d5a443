"""The lake domain's definitions: the maintenance schedule, which brings its job (launchable by hand while it is off)."""

from dagster import Definitions

from imgemb_assets.dagster_wiring.lake.maintenance import build_maintenance_schedule
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_lake_defs(settings: LocationSettings, model_code_version: str) -> Definitions:
    return Definitions(schedules=[build_maintenance_schedule(settings)])

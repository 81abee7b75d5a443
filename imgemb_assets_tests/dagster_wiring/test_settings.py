"""How LocationSettings reads the IMGEMB_* variables: only from the mapping it is given, with pydantic-settings'
parsing, and with errors that name the variable."""

from __future__ import annotations

import re

import pytest

from imgemb_assets.core.lake.data_files import TARGET_FILE_BYTES
from imgemb_assets.core.lake.maintenance import MaintenanceSettings
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import DEFAULT_MAX_NEW_PREFIXES, DEFAULT_RECENT_PREFIXES
from imgemb_assets.dagster_wiring.location.settings import DEFAULT_MINIMUM_INTERVAL_S, LocationSettings, SettingsError


def test_the_constructor_never_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGEMB_GPU_COUNT", "4")
    monkeypatch.setenv("IMGEMB_MAX_PARTITIONS_PER_RUN", "2")
    assert LocationSettings().gpu_count == 1
    assert LocationSettings(max_partitions_per_run=7).gpu_count == 1
    # from_environ reads the mapping it is given, not os.environ
    assert LocationSettings.from_environ({}) == LocationSettings()
    assert LocationSettings.from_environ({"IMGEMB_GPU_COUNT": "2"}).max_partitions_per_run == 32


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        ("TRUE", True),
        ("false", False),
        ("no", False),
        ("off", False),
        ("0", False),
        ("False", False),
    ],
)
def test_booleans_take_the_usual_spellings(raw: str, expected: bool) -> None:
    settings = LocationSettings.from_environ({"IMGEMB_VACUUM_ALLOW_SHORT_RETENTION": raw})
    assert settings.vacuum_allow_short_retention is expected


def test_an_empty_variable_leaves_the_default_and_lower_case_names_are_not_settings() -> None:
    empty = dict.fromkeys(("IMGEMB_GPU_COUNT", "IMGEMB_CELERY_BROKER_URL", "IMGEMB_K8S_GPU_TOLERATIONS"), "")
    settings = LocationSettings.from_environ({**empty, "imgemb_executor": "k8s"})
    assert settings == LocationSettings()


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({"IMGEMB_ECS_GPU_RUN_TASK_KWARGS": "{capacity"}, "IMGEMB_ECS_GPU_RUN_TASK_KWARGS is not valid JSON"),
        ({"IMGEMB_K8S_GPU_NODE_SELECTOR": "[]"}, "IMGEMB_K8S_GPU_NODE_SELECTOR must be a JSON object"),
        ({"IMGEMB_MAX_PARTITIONS_PER_RUN": "0"}, "IMGEMB_MAX_PARTITIONS_PER_RUN must be >= 1, got '0'"),
        ({"IMGEMB_SENSOR_RECENT_PREFIXES": "-1"}, "IMGEMB_SENSOR_RECENT_PREFIXES must be >= 0"),
        ({"IMGEMB_VANISHED_PREFIXES": "drop"}, "IMGEMB_VANISHED_PREFIXES must be one of 'keep' or 'remove'"),
    ],
)
def test_errors_name_the_variable_and_the_problem(environ: dict[str, str], error: str) -> None:
    with pytest.raises(SettingsError, match=error):
        LocationSettings.from_environ(environ)


def test_code_that_builds_settings_gets_the_same_errors() -> None:
    with pytest.raises(SettingsError, match="IMGEMB_COMPACT_MIN_FILES must be >= 2"):
        LocationSettings(compact_min_files=1)


def test_the_defaults_are_written_once() -> None:
    defaults = LocationSettings()
    assert (DEFAULT_MINIMUM_INTERVAL_S, DEFAULT_RECENT_PREFIXES, DEFAULT_MAX_NEW_PREFIXES) == (
        defaults.automation_interval_s(),
        defaults.sensor_recent_prefixes,
        defaults.sensor_max_new_prefixes,
    )
    # compaction aims at the size Lake writes
    assert MaintenanceSettings().target_file_bytes == defaults.compact_target_file_bytes == TARGET_FILE_BYTES


@pytest.mark.parametrize("cron", ["not a cron", "0 3 * *", "61 3 * * *", "0 3 30 2 *", "0 0 3 * * *"])
def test_an_invalid_maintenance_cron_is_refused_naming_the_variable_and_the_value(cron: str) -> None:
    # issue 23 item 9: accepted here, then the code location failed to load on Dagster's
    # "invalid cron schedule ... for schedule 'lake_maintenance_schedule'", which names no variable.
    with pytest.raises(
        SettingsError, match=rf"^IMGEMB_MAINTENANCE_CRON must be a cron expression .*, got {re.escape(repr(cron))}$"
    ):
        LocationSettings.from_environ({"IMGEMB_MAINTENANCE_CRON": cron})
    with pytest.raises(SettingsError, match="IMGEMB_MAINTENANCE_CRON"):
        LocationSettings(maintenance_cron=cron)
    # what Dagster's schedules accept is accepted
    assert LocationSettings.from_environ({"IMGEMB_MAINTENANCE_CRON": "30 2 * * 0"}).maintenance_cron == "30 2 * * 0"

"""Everything users see of the code location, against a golden file: a move or a rename inside changes none of it.

The snapshot lists asset keys (group, kinds, partitions, code version, automation,
pool, parents), asset checks, jobs (with the assets they select), sensors,
schedules and resource keys. When a change is meant to alter what users see,
regenerate the file and review its diff:

    UPDATE_DEFINITIONS_SNAPSHOT=1 .venv/bin/python -m pytest imgemb_assets_tests/dagster_wiring/test_definitions_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from dagster import Definitions

from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.definitions import build_definitions

SNAPSHOT = Path(__file__).with_name("definitions_snapshot.json")


def definitions_snapshot(defs: Definitions) -> dict[str, Any]:
    graph = defs.resolve_asset_graph()
    assets: dict[str, Any] = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "materializable": node.is_materializable,
            "partitions": getattr(partitions, "name", None) or (type(partitions).__name__ if partitions else None),
            "code_version": node.code_version,
            "automation": str(node.automation_condition.get_label() or type(node.automation_condition).__name__)
            if node.automation_condition is not None
            else None,
            "pools": sorted(node.pools or ()),
            "parents": sorted(parent.to_user_string() for parent in node.parent_keys),
        }
    checks = sorted(f"{check.asset_key.to_user_string()}:{check.name}" for check in graph.asset_check_keys)
    jobs = {
        job.name: sorted(key.to_user_string() for key in job.asset_layer.selected_asset_keys)
        for job in sorted(defs.resolve_all_job_defs(), key=lambda job: job.name)
    }
    return {
        "assets": assets,
        "asset_checks": checks,
        "jobs": jobs,
        "sensors": sorted(sensor.name for sensor in defs.sensors or []),
        "schedules": sorted(schedule.name for schedule in defs.schedules or []),
        "resources": sorted(defs.resources or {}),
    }


def test_what_users_see_of_the_location_matches_the_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("IMGEMB_")]:
        monkeypatch.delenv(name)  # the location as shipped, whatever this shell sets
    current = definitions_snapshot(build_definitions(LocationSettings()))
    if os.environ.get("UPDATE_DEFINITIONS_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())

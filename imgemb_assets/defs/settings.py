"""Deployment settings of the code location, read when Dagster loads it (never at import).

    IMGEMB_EXECUTOR                 in_process (default), multiprocess, celery, ecs or k8s
    IMGEMB_CELERY_BROKER_URL        the celery executor's broker (e.g. redis://host:6379/0)
    IMGEMB_CELERY_BACKEND_URL       the celery executor's result backend (e.g. redis://host:6379/1)
    IMGEMB_MAX_PARTITIONS_PER_RUN   prefixes one run takes in a backfill or automation (default 32)
    IMGEMB_GPU_COUNT                GPUs the embedding step asks for (default 1)
    IMGEMB_K8S_GPU_NODE_SELECTOR    JSON object, the embedding pod's nodeSelector
    IMGEMB_K8S_GPU_TOLERATIONS      JSON list, the embedding pod's tolerations
    IMGEMB_ECS_GPU_RUN_TASK_KWARGS  JSON object merged into the embedding task's run_task call
                                    (for example a GPU capacity provider strategy)
    IMGEMB_SENSOR_INTERVAL_S        minimum interval of the discovery and sales sensors (default 30)
    IMGEMB_SENSOR_RECENT_PREFIXES   known prefixes re-listed on each discovery tick (default 3)
    IMGEMB_SENSOR_MAX_NEW_PREFIXES  new prefixes taken per discovery tick (default 100)
    IMGEMB_RECONCILIATION_INTERVAL_S          minimum interval of the rolling reconciliation (default 600)
    IMGEMB_RECONCILIATION_PREFIXES_PER_TICK   registered prefixes it re-lists per tick (default 500)
    IMGEMB_VANISHED_PREFIXES        keep (default) or remove: what becomes of a registered prefix that has
                                    no object left in the root (keep: it stays registered and empties out;
                                    remove: its rows leave every table and the partition leaves the instance)
    IMGEMB_MAINTENANCE_CRON         cron (UTC) of the lake_maintenance schedule, which is off until
                                    turned on (default "0 3 * * *": daily at 03:00 UTC)
    IMGEMB_COMPACT_MIN_FILES        a partition is compacted once it holds this many small files (default 4)
    IMGEMB_COMPACT_TARGET_FILE_BYTES  size compaction aims at (default 268435456, Lake's write size)
    IMGEMB_VACUUM_RETENTION_HOURS   vacuum deletes unreferenced files older than this (default 168,
                                    Delta's default); readers and writes must not last longer
    IMGEMB_VACUUM_ALLOW_SHORT_RETENTION  true to allow a retention below 168 hours (default false)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

EXECUTORS: Final = ("in_process", "multiprocess", "celery", "ecs", "k8s")
VANISHED_PREFIX_POLICIES: Final = ("keep", "remove")
_DEFAULT_NODE_SELECTOR: Final = {"nvidia.com/gpu.present": "true"}
_DEFAULT_TOLERATIONS: Final = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# Delta's default `delta.deletedFileRetentionDuration`, in hours.
_DELTA_RETENTION_HOURS: Final = 168
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A deployment setting is invalid; the message names the variable."""


@dataclass(frozen=True)
class LocationSettings:
    # Locally every step runs in the run's own process: starting a process per
    # step (imports, resources) cost more than the CPU steps' work. The cloud
    # executors launch each step separately, which puts the embedding step on a GPU.
    executor: str = "in_process"
    # Prefixes per run: imports, resources and the model are paid once per run,
    # and a failing run holds back at most this many prefixes.
    max_partitions_per_run: int = 32
    gpu_count: int = 1
    k8s_gpu_node_selector: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_NODE_SELECTOR))
    k8s_gpu_tolerations: list[dict[str, Any]] = field(default_factory=lambda: [dict(t) for t in _DEFAULT_TOLERATIONS])
    ecs_gpu_run_task_kwargs: dict[str, Any] = field(default_factory=dict)
    # None leaves dagster-celery's own defaults (an AMQP broker on localhost, the rpc:// backend);
    # the workers must be started with the same URLs, or they never see the steps.
    celery_broker_url: str | None = None
    celery_backend_url: str | None = None
    sensor_interval_s: int = 30
    sensor_recent_prefixes: int = 3
    # A first tick over a bucket with many prefixes must finish within Dagster's
    # sensor time limit (60 s by default); the rest are taken on later ticks.
    sensor_max_new_prefixes: int = 100
    # A full pass over P prefixes takes ceil(P / per_tick) ticks: with the
    # defaults, 10,000 prefixes are all re-listed every 200 minutes, each tick
    # well within the sensor time limit.
    reconciliation_interval_s: int = 600
    reconciliation_prefixes_per_tick: int = 500
    # Removing is opt-in: a prefix deleted by mistake should cost a re-upload, not
    # every table's rows of it (defs/lifecycle.py).
    vanished_prefixes: str = "keep"
    # Lake maintenance (defs/maintenance.py). Its schedule is off by default: it
    # must not race the partition writers, and only a deployment knows when they rest.
    maintenance_cron: str = "0 3 * * *"
    # The defaults of core.maintenance.MaintenanceSettings (a test holds them equal), not
    # imported: this module stays free of deltalake for the CLI.
    compact_min_files: int = 4
    compact_target_file_bytes: int = 256 << 20
    vacuum_retention_hours: int = _DELTA_RETENTION_HOURS
    vacuum_allow_short_retention: bool = False

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise SettingsError(f"IMGEMB_EXECUTOR must be one of {EXECUTORS}, got {self.executor!r}")
        if self.max_partitions_per_run < 1:
            raise SettingsError(f"IMGEMB_MAX_PARTITIONS_PER_RUN must be at least 1, got {self.max_partitions_per_run}")
        if self.gpu_count < 1:
            raise SettingsError(f"IMGEMB_GPU_COUNT must be at least 1, got {self.gpu_count}")
        if self.sensor_interval_s < 1 or self.sensor_recent_prefixes < 0 or self.sensor_max_new_prefixes < 1:
            raise SettingsError(
                "IMGEMB_SENSOR_INTERVAL_S and IMGEMB_SENSOR_MAX_NEW_PREFIXES must be >= 1, "
                "IMGEMB_SENSOR_RECENT_PREFIXES >= 0"
            )
        if self.reconciliation_interval_s < 1 or self.reconciliation_prefixes_per_tick < 1:
            raise SettingsError(
                "IMGEMB_RECONCILIATION_INTERVAL_S and IMGEMB_RECONCILIATION_PREFIXES_PER_TICK must be >= 1"
            )
        if self.vanished_prefixes not in VANISHED_PREFIX_POLICIES:
            raise SettingsError(
                f"IMGEMB_VANISHED_PREFIXES must be one of {VANISHED_PREFIX_POLICIES}, got {self.vanished_prefixes!r}"
            )
        if self.compact_min_files < 2 or self.compact_target_file_bytes < 1:
            raise SettingsError("IMGEMB_COMPACT_MIN_FILES must be >= 2, IMGEMB_COMPACT_TARGET_FILE_BYTES >= 1")
        if self.vacuum_retention_hours < 1:
            raise SettingsError(f"IMGEMB_VACUUM_RETENTION_HOURS must be >= 1, got {self.vacuum_retention_hours}")
        if self.vacuum_retention_hours < _DELTA_RETENTION_HOURS and not self.vacuum_allow_short_retention:
            raise SettingsError(
                f"IMGEMB_VACUUM_RETENTION_HOURS={self.vacuum_retention_hours} is below Delta's default of "
                f"{_DELTA_RETENTION_HOURS} hours: a reader or a write lasting longer would lose its files; "
                "set IMGEMB_VACUUM_ALLOW_SHORT_RETENTION=true if none does"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LocationSettings:
        defaults = cls()
        return cls(
            executor=environ.get("IMGEMB_EXECUTOR", defaults.executor),
            max_partitions_per_run=_int(environ, "IMGEMB_MAX_PARTITIONS_PER_RUN", defaults.max_partitions_per_run),
            gpu_count=_int(environ, "IMGEMB_GPU_COUNT", defaults.gpu_count),
            k8s_gpu_node_selector=_json(environ, "IMGEMB_K8S_GPU_NODE_SELECTOR", defaults.k8s_gpu_node_selector, dict),
            k8s_gpu_tolerations=_json(environ, "IMGEMB_K8S_GPU_TOLERATIONS", defaults.k8s_gpu_tolerations, list),
            ecs_gpu_run_task_kwargs=_json(environ, "IMGEMB_ECS_GPU_RUN_TASK_KWARGS", defaults.ecs_gpu_run_task_kwargs, dict),
            celery_broker_url=environ.get("IMGEMB_CELERY_BROKER_URL") or defaults.celery_broker_url,
            celery_backend_url=environ.get("IMGEMB_CELERY_BACKEND_URL") or defaults.celery_backend_url,
            sensor_interval_s=_int(environ, "IMGEMB_SENSOR_INTERVAL_S", defaults.sensor_interval_s),
            sensor_recent_prefixes=_int(environ, "IMGEMB_SENSOR_RECENT_PREFIXES", defaults.sensor_recent_prefixes),
            sensor_max_new_prefixes=_int(environ, "IMGEMB_SENSOR_MAX_NEW_PREFIXES", defaults.sensor_max_new_prefixes),
            reconciliation_interval_s=_int(
                environ, "IMGEMB_RECONCILIATION_INTERVAL_S", defaults.reconciliation_interval_s
            ),
            reconciliation_prefixes_per_tick=_int(
                environ, "IMGEMB_RECONCILIATION_PREFIXES_PER_TICK", defaults.reconciliation_prefixes_per_tick
            ),
            vanished_prefixes=environ.get("IMGEMB_VANISHED_PREFIXES") or defaults.vanished_prefixes,
            maintenance_cron=environ.get("IMGEMB_MAINTENANCE_CRON") or defaults.maintenance_cron,
            compact_min_files=_int(environ, "IMGEMB_COMPACT_MIN_FILES", defaults.compact_min_files),
            compact_target_file_bytes=_int(
                environ, "IMGEMB_COMPACT_TARGET_FILE_BYTES", defaults.compact_target_file_bytes
            ),
            vacuum_retention_hours=_int(environ, "IMGEMB_VACUUM_RETENTION_HOURS", defaults.vacuum_retention_hours),
            vacuum_allow_short_retention=_bool(
                environ, "IMGEMB_VACUUM_ALLOW_SHORT_RETENTION", defaults.vacuum_allow_short_retention
            ),
        )


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be one of {_TRUE + _FALSE}, got {raw!r}")


def _json(environ: Mapping[str, str], name: str, default: Any, kind: type) -> Any:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise SettingsError(f"{name} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value

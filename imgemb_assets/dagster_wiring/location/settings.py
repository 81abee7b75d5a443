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
    IMGEMB_MODEL                    the embedding_model resource's backbone unless run config names another
                                    (default resnet50; clip_vit_b_32, ... as in core/embedding/backbones/specs.py)
    IMGEMB_PARTITION_SCHEME         how the raw-images root is cut into partitions (default folders: one per
                                    first-level folder, loose objects in 16 hash buckets); folders:N,
                                    folders:N,hash:B, hash:B, optionally ,loose:L (core/ingest/partition_scheme.py)
    IMGEMB_S3_EVENTS_QUEUE_URL      an SQS queue receiving the bucket's S3 event notifications: the discovery
                                    sensor then reads it and lists nothing (default: none, it lists)
    IMGEMB_SENSOR_INTERVAL_S        minimum interval of the sensors and of automation's evaluations (default: 30;
                                    the discovery sensor 5 where a tick costs no S3 request: a local root,
                                    or the S3 event queue)
    IMGEMB_RAW_IMAGES_URI           the raw-images root (read by the storage resource when a run starts);
                                    here only to choose the discovery sensor's default interval
    IMGEMB_SENSOR_RECENT_PREFIXES   known prefixes re-listed on each discovery tick (default 3)
    IMGEMB_SENSOR_MAX_NEW_PREFIXES  new prefixes taken per discovery tick (default 100)
    IMGEMB_SENSOR_MAX_ROOT_PAGES    pages of the root's listing (1,000 keys each on S3) one discovery tick reads;
                                    a bigger root is listed over several ticks (default 100)
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

An empty variable leaves the default. pydantic-settings parses the values: integers, booleans
(true/false, yes/no, on/off, 1/0) and JSON; an invalid one raises SettingsError, which names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal, get_args

import pydantic
import pydantic_settings
from dagster._utils.schedules import is_valid_cron_string
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from imgemb_assets.core.embedding.backbones.specs import BackboneName
from imgemb_assets.core.ingest.partition_scheme import DEFAULT_SCHEME_TEXT, PartitionScheme, PartitionSchemeError
from imgemb_assets.core.lake import maintenance_defaults

Executor = Literal["in_process", "multiprocess", "celery", "ecs", "k8s"]
VanishedPrefixPolicy = Literal["keep", "remove"]
EXECUTORS: Final = get_args(Executor)
VANISHED_PREFIX_POLICIES: Final = get_args(VanishedPrefixPolicy)
_ENV_PREFIX: Final = "IMGEMB_"
LISTING_INTERVAL_S: Final = 30
CHEAP_TICK_INTERVAL_S: Final = 5
# How a pydantic error reads after the variable's name; other errors keep pydantic's own words.
_PROBLEMS: Final = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_parsing": "must be true or false (also yes/no, on/off, 1/0)",
    "list_type": "must be a JSON list",
    "dict_type": "must be a JSON object",
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be >= {ge}",
    "cron_schedule": (
        "must be a cron expression Dagster's schedules take: 5 fields (minute hour day-of-month month "
        "day-of-week, in UTC) that some date matches, e.g. '0 3 * * *'"
    ),
}


class SettingsError(ValueError):
    """A deployment setting is invalid; the message names the variable."""


class LocationSettings(BaseSettings):
    # "" leaves the default, as an unset variable does. Not case_sensitive: pydantic-settings would
    # then read `IMGEMB_gpu_count`, the field's own spelling; _MappingEnvSource reads upper case only.
    model_config = SettingsConfigDict(env_prefix=_ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid")

    # Locally every step runs in the run's own process: starting a process per
    # step (imports, resources) cost more than the CPU steps' work. The cloud
    # executors launch each step separately, which puts the embedding step on a GPU.
    executor: Executor = "in_process"
    # Prefixes per run: imports, resources and the model are paid once per run,
    # and a failing run holds back at most this many prefixes.
    max_partitions_per_run: int = Field(32, ge=1)
    gpu_count: int = Field(1, ge=1)
    k8s_gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    k8s_gpu_tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    ecs_gpu_run_task_kwargs: dict[str, Any] = Field(default_factory=dict)
    # None leaves dagster-celery's own defaults (an AMQP broker on localhost, the rpc:// backend);
    # the workers must be started with the same URLs, or they never see the steps.
    celery_broker_url: str | None = None
    celery_backend_url: str | None = None
    # Read when the location loads, like the weights for the code version: the UI, the sensors and
    # automation then embed (and mark stale) with the same backbone as the runs a user launches.
    model: BackboneName = "resnet50"
    # Parsed (and so validated) here, kept as its canonical text for the storage resource.
    partition_scheme: str = DEFAULT_SCHEME_TEXT
    # Discovery from the bucket's event notifications instead of listings (sensors.py, core/ingest/notifications.py).
    s3_events_queue_url: str | None = None
    # None: automation_interval_s() and discovery_interval_s() choose (LISTING_INTERVAL_S, CHEAP_TICK_INTERVAL_S).
    sensor_interval_s: int | None = Field(None, ge=1)
    raw_images_uri: str | None = None
    sensor_recent_prefixes: int = Field(3, ge=0)
    # A first tick over a bucket with many prefixes must finish within Dagster's
    # sensor time limit (60 s by default); the rest are taken on later ticks.
    sensor_max_new_prefixes: int = Field(100, ge=1)
    # A root of a million loose objects is 1,000 listing pages: a tick lists at most this many
    # (about 100,000 keys, a few seconds on S3) and the next resumes where it stopped.
    sensor_max_root_pages: int = Field(100, ge=1)
    # A full pass over P prefixes takes ceil(P / per_tick) ticks: with the
    # defaults, 10,000 prefixes are all re-listed every 200 minutes, each tick
    # well within the sensor time limit.
    reconciliation_interval_s: int = Field(600, ge=1)
    reconciliation_prefixes_per_tick: int = Field(500, ge=1)
    # Removing is opt-in: a prefix deleted by mistake should cost a re-upload, not
    # every table's rows of it (dagster_wiring/lifecycle.py).
    vanished_prefixes: VanishedPrefixPolicy = "keep"
    # Lake maintenance (dagster_wiring/maintenance.py). Its schedule is off by default: it
    # must not race the partition writers, and only a deployment knows when they rest.
    maintenance_cron: str = "0 3 * * *"
    # core.maintenance.MaintenanceSettings' defaults, from the deltalake-free module it takes them from.
    compact_min_files: int = Field(maintenance_defaults.COMPACT_MIN_FILES, ge=2)
    compact_target_file_bytes: int = Field(maintenance_defaults.TARGET_FILE_BYTES, ge=1)
    # 0 would delete the data files of every write in flight.
    vacuum_retention_hours: int = Field(maintenance_defaults.DELTA_DEFAULT_RETENTION_HOURS, ge=1)
    vacuum_allow_short_retention: bool = False

    def __init__(self, **values: Any) -> None:
        # One kind of error whether the values come from code or from the environment.
        try:
            super().__init__(**values)
        except pydantic.ValidationError as exc:
            raise SettingsError(_described(exc)) from exc

    @field_validator("partition_scheme")
    @classmethod
    def _scheme_parses(cls, text: str) -> str:
        try:
            return str(PartitionScheme.parse(text))
        except PartitionSchemeError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("maintenance_cron")
    @classmethod
    def _cron_is_a_schedule(cls, cron: str) -> str:
        # The check Dagster's ScheduleDefinition applies: refused there, it would take the whole
        # code location down with an error that names the schedule, not the variable.
        if not is_valid_cron_string(cron):
            raise PydanticCustomError("cron_schedule", "not a cron expression Dagster's schedules take")
        return cron

    @model_validator(mode="after")
    def _short_retention_is_meant(self) -> LocationSettings:
        shortest = maintenance_defaults.DELTA_DEFAULT_RETENTION_HOURS
        if self.vacuum_retention_hours < shortest and not self.vacuum_allow_short_retention:
            raise ValueError(
                f"IMGEMB_VACUUM_RETENTION_HOURS={self.vacuum_retention_hours} is below Delta's default of "
                f"{shortest} hours: a reader or a write lasting longer would lose its files; "
                "set IMGEMB_VACUUM_ALLOW_SHORT_RETENTION=true if none does"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The constructor takes its arguments and the defaults, never os.environ, a .env file or
        # secrets: tests and benchmarks build settings next to a deployment's IMGEMB_* variables.
        return (init_settings,)

    def automation_interval_s(self) -> int:
        """Of the automation sensor and the sales sensor: Dagster's usual 30 s unless set."""
        return self.sensor_interval_s or LISTING_INTERVAL_S

    def discovery_interval_s(self) -> int:
        """Of the discovery sensor: 30 s where each tick lists an S3 root (requests are billed), else 5.

        A new prefix's runs start in the tick that registers it, so this interval is most of
        the wait between a prefix landing and its work starting. A tick of a local root, or of
        the bucket's event queue, costs no S3 request; Dagster's sensor loop runs every 5 s.
        """
        if self.sensor_interval_s is not None:
            return self.sensor_interval_s
        lists_s3 = (self.raw_images_uri or "").startswith("s3://") and not self.s3_events_queue_url
        return LISTING_INTERVAL_S if lists_s3 else CHEAP_TICK_INTERVAL_S

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LocationSettings:
        """The IMGEMB_* variables of `environ` over the defaults; SettingsError names a bad one."""
        try:
            values = _MappingEnvSource(cls, environ)()
        except pydantic_settings.SettingsError as exc:
            # The source wraps its decoding errors; the one _MappingEnvSource raises names the variable.
            if isinstance(exc.__cause__, SettingsError):
                raise exc.__cause__ from exc
            raise SettingsError(str(exc)) from exc
        return cls(**values)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, JSON of dicts and lists) over a given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # As the base does with os.environ, but only the names written in upper case, as documented:
        # a Linux environment tells `imgemb_gpu_count` apart, and it was never a setting.
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if name.isupper() and not (self.env_ignore_empty and value == "")
        }

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{_variable(field_name)} is not valid JSON: {exc}") from exc


def _variable(field_name: str) -> str:
    return f"{_ENV_PREFIX}{field_name.upper()}"


def _described(exc: pydantic.ValidationError) -> str:
    """Each error as the variable it concerns, its problem and the value given."""
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across fields, whose message names its variables
            lines.append(str(error.get("ctx", {}).get("error", error["msg"])))
            continue
        field_name, *inside = error["loc"]
        where = "".join(f"[{key!r}]" for key in inside)  # an entry of a JSON value
        template = _PROBLEMS.get(error["type"])
        problem = template.format(**error.get("ctx", {})) if template else f"is invalid ({error['msg']})"
        lines.append(f"{_variable(str(field_name))}{where} {problem}, got {error['input']!r}")
    return "; ".join(lines)


# The automation and sales sensors' interval where settings leave it unset, for sensors built without settings.
DEFAULT_MINIMUM_INTERVAL_S: Final = LocationSettings().automation_interval_s()

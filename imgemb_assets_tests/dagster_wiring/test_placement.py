"""GPU placement: the pool and GPU tags sit on the embedding step only, each executor's config validates,
and the GPU request reaches the step's launch parameters as the ECS and Kubernetes step handlers build them.

No ECS cluster or Kubernetes API exists here: the ECS check calls the step
handler's own override parsing, and the Kubernetes check builds the step's
V1Job with dagster-k8s's own job constructor, without submitting either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, Definitions
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster_aws.ecs.executor import EcsStepHandler
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.location.placement import celery_executor_config, gpu_step_tags
from imgemb_assets.dagster_wiring.location.settings import LocationSettings, SettingsError
from imgemb_assets.dagster_wiring.names import GPU_POOL
from imgemb_assets.definitions import build_definitions


def _node(defs: Definitions, asset: str):  # type: ignore[no-untyped-def]
    return defs.resolve_assets_def(AssetKey(asset)).node_def


def test_only_the_embedding_step_is_in_the_gpu_pool_with_gpu_tags() -> None:
    defs = build_definitions(LocationSettings())
    for name in tables.ALL_TABLES:
        node = _node(defs, name)
        gpu_tagged = {"ecs/container_overrides", "dagster-k8s/config", "dagster-celery/queue"} & set(node.tags)
        if name == tables.IMAGE_EMBEDDINGS:
            assert node.pool == GPU_POOL
            assert gpu_tagged == {"ecs/container_overrides", "dagster-k8s/config", "dagster-celery/queue"}
            assert node.tags["dagster-celery/queue"] == "gpu"
        else:
            assert node.pool is None and not gpu_tagged, name


def test_ecs_step_handler_reads_the_gpu_request_and_run_task_kwargs() -> None:
    settings = LocationSettings(
        gpu_count=2,
        ecs_gpu_run_task_kwargs={"capacityProviderStrategy": [{"capacityProvider": "gpu-asg", "weight": 1}]},
    )
    tags = gpu_step_tags(settings)
    overrides = EcsStepHandler._get_container_overrides(None, tags)  # type: ignore[arg-type]  # pure tag parsing
    assert overrides == {"resourceRequirements": [{"type": "GPU", "value": "2"}]}
    assert json.loads(tags["ecs/run_task_kwargs"])["capacityProviderStrategy"][0]["capacityProvider"] == "gpu-asg"


def test_k8s_step_job_requests_the_gpu_on_the_gpu_nodes() -> None:
    settings = LocationSettings(
        k8s_gpu_node_selector={"pool": "a100"},
        k8s_gpu_tolerations=[{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}],
    )
    user_config = get_user_defined_k8s_config(gpu_step_tags(settings))
    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(job_image="imgemb:latest", dagster_home="/opt/dagster/home"),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-image-embeddings",
        user_defined_k8s_config=user_config,
        pod_name="dagster-step-image-embeddings",
        component="step_worker",
    )
    pod = job.spec.template.spec
    assert pod.containers[0].resources.limits == {"nvidia.com/gpu": "1"}
    assert pod.node_selector == {"pool": "a100"}
    assert [t.key for t in pod.tolerations] == ["gpu"]


@pytest.mark.parametrize(
    ("executor", "config"),
    [
        ("in_process", {}),
        ("multiprocess", {"max_concurrent": 2}),
        ("celery", {"include": ["imgemb_assets.definitions"]}),
        ("ecs", {"run_task_kwargs": {"capacityProviderStrategy": [{"capacityProvider": "cpu", "weight": 1}]}}),
        ("k8s", {"job_namespace": "dagster", "max_concurrent": 4}),
    ],
)
def test_each_executor_is_selectable_and_its_config_validates(executor: str, config: dict) -> None:
    defs = build_definitions(LocationSettings(executor=executor))
    Definitions.validate_loadable(defs)
    executor_def = defs.resolve_job_def("embed_prefix").executor_def
    assert (
        executor_def.name
        == {"in_process": "in_process", "multiprocess": "multiprocess", "celery": "celery", "ecs": "ecs", "k8s": "k8s"}[
            executor
        ]
    )
    result = validate_config(executor_def.config_schema.config_type, config)
    assert result.success, result.errors


def test_the_celery_executor_takes_its_broker_and_backend_from_the_settings() -> None:
    settings = LocationSettings.from_environ(
        {
            "IMGEMB_EXECUTOR": "celery",
            "IMGEMB_CELERY_BROKER_URL": "redis://broker:6379/0",
            "IMGEMB_CELERY_BACKEND_URL": "redis://broker:6379/1",
        }
    )
    assert celery_executor_config(settings) == {"broker": "redis://broker:6379/0", "backend": "redis://broker:6379/1"}
    executor_def = build_definitions(settings).resolve_job_def("embed_prefix").executor_def
    assert executor_def.name == "celery"
    # The URLs are fixed for every run of the location: a run config needs none, and the executor gets them.
    resolved = executor_def.apply_config_mapping({})
    assert resolved.success, resolved.errors
    config = resolved.value["config"]
    assert (config["broker"], config["backend"]) == ("redis://broker:6379/0", "redis://broker:6379/1")
    # Unset, the URLs stay dagster-celery's own defaults rather than empty strings.
    assert celery_executor_config(LocationSettings(executor="celery")) == {}


def test_the_local_default_runs_every_step_in_the_run_process() -> None:
    assert build_definitions(LocationSettings()).resolve_job_def("embed_prefix").executor_def.name == "in_process"


def test_settings_come_from_the_environment_with_clear_errors() -> None:
    settings = LocationSettings.from_environ(
        {"IMGEMB_EXECUTOR": "k8s", "IMGEMB_GPU_COUNT": "4", "IMGEMB_K8S_GPU_NODE_SELECTOR": '{"gpu": "h100"}'}
    )
    assert (settings.executor, settings.gpu_count, settings.k8s_gpu_node_selector) == ("k8s", 4, {"gpu": "h100"})
    assert LocationSettings.from_environ({}) == LocationSettings()
    with pytest.raises(SettingsError, match="IMGEMB_EXECUTOR must be one of"):
        LocationSettings.from_environ({"IMGEMB_EXECUTOR": "lambda"})
    with pytest.raises(SettingsError, match="IMGEMB_K8S_GPU_TOLERATIONS must be a JSON list"):
        LocationSettings.from_environ({"IMGEMB_K8S_GPU_TOLERATIONS": "{}"})
    with pytest.raises(SettingsError, match="IMGEMB_GPU_COUNT must be an integer"):
        LocationSettings.from_environ({"IMGEMB_GPU_COUNT": "two"})


REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", [".", "deploy/ecs"])
def test_shipped_instance_configs_validate(folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "x")
    config, _ = dagster_instance_config(str(REPO_ROOT / folder), "dagster.yaml")
    assert config["concurrency"]["pools"]["default_limit"] >= 1  # bounds the gpu pool
    # A slot held by a step that died with its worker is freed by the daemon, or the pool stays blocked.
    assert config["run_monitoring"]["enabled"] is True
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    # Skipped sensor ticks hold the discovery cursor (0.5 MB at 10,000 prefixes): not kept a week.
    assert config["retention"]["sensor"]["purge_after_days"]["skipped"] == 1


def test_helm_values_ask_for_the_k8s_executor_and_gpu_nodes() -> None:
    values = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    settings = LocationSettings.from_environ(env)
    assert settings.executor == "k8s"
    assert settings.k8s_gpu_node_selector == {"nvidia.com/gpu.present": "true"}
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert monitoring["enabled"] is True and monitoring["freeSlotsAfterRunEndSeconds"] > 0

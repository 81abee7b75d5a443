"""Where steps run: the code location's executor, and the GPU request carried by the embedding step.

Each run has one executor, and UI materializations, backfills and sensor runs
all use the code location's. Locally the default runs every step in the run's
own process; a step-isolating executor (ECS or Kubernetes in production, or
multiprocess locally) launches each step on its own, and reads the embedding
step's tags to put it on a GPU. The `gpu` pool limits how many embedding steps
run at once across runs, under every executor.
"""

import json

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor

from imgemb_assets.defs.settings import LocationSettings

GPU_POOL = "gpu"


def gpu_step_tags(settings: LocationSettings) -> dict[str, str]:
    """Op tags that place a step on GPU hardware under each executor that reads them."""
    gpus = str(settings.gpu_count)
    k8s_config = {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": gpus}}},
        "pod_spec_config": {
            "node_selector": settings.k8s_gpu_node_selector,
            "tolerations": settings.k8s_gpu_tolerations,
        },
    }
    tags = {
        "ecs/container_overrides": json.dumps({"resourceRequirements": [{"type": "GPU", "value": gpus}]}),
        "dagster-k8s/config": json.dumps(k8s_config),
        "dagster-celery/queue": "gpu",
    }
    if settings.ecs_gpu_run_task_kwargs:
        tags["ecs/run_task_kwargs"] = json.dumps(settings.ecs_gpu_run_task_kwargs)
    return tags


def location_executor(settings: LocationSettings) -> ExecutorDefinition:
    # The cloud executors are imported only when chosen: each costs about a second
    # at every load of the code location.
    if settings.executor == "ecs":
        from dagster_aws.ecs import ecs_executor

        return ecs_executor
    if settings.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if settings.executor == "multiprocess":
        return multiprocess_executor
    return in_process_executor

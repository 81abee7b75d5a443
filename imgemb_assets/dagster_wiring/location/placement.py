"""Where steps run: the code location's executor, and the GPU request carried by the embedding step.

Each run has one executor, and UI materializations, backfills and sensor runs
all use the code location's. Locally the default runs every step in the run's
own process; a step-isolating executor (ECS, Kubernetes or Celery in production,
or multiprocess locally) launches each step on its own, and reads the embedding
step's tags to put it on a GPU (under Celery: the `gpu` queue, which only GPU
workers consume). The `gpu` pool limits how many embedding steps run at once
across runs, under every executor.
"""

import json
import os
import socket
from typing import Any

import dagster as dg

from imgemb_assets.dagster_wiring.location.settings import LocationSettings


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


def worker_identity() -> str:
    """Who runs this step: `IMGEMB_WORKER_NAME@host:pid`, or `host:pid` when the variable is unset.

    Read when a step runs, in the step's own process: under a step-isolating executor
    that is the worker (a Celery worker, an ECS task, a pod), not the run's process.
    """
    where = f"{socket.gethostname()}:{os.getpid()}"
    name = os.environ.get("IMGEMB_WORKER_NAME")
    return f"{name}@{where}" if name else where


def celery_executor_config(settings: LocationSettings) -> dict[str, Any]:
    """The celery executor's config from the settings; unset URLs keep dagster-celery's defaults."""
    config: dict[str, Any] = {}
    if settings.celery_broker_url:
        config["broker"] = settings.celery_broker_url
    if settings.celery_backend_url:
        config["backend"] = settings.celery_backend_url
    return config


def location_executor(settings: LocationSettings) -> dg.ExecutorDefinition:
    # The cloud executors are imported only when chosen: each costs about a second
    # at every load of the code location.
    if settings.executor == "celery":
        from dagster_celery import celery_executor

        config = celery_executor_config(settings)
        # configured() fixes the URLs for every run of the location (UI, backfills,
        # sensors) so that no run config has to repeat them.
        return celery_executor.configured(config, name="celery") if config else celery_executor
    if settings.executor == "ecs":
        from imgemb_assets.dagster_wiring.location.ecs_executor import ecs_capacity_provider_executor

        return ecs_capacity_provider_executor()
    if settings.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if settings.executor == "multiprocess":
        return dg.multiprocess_executor
    return dg.in_process_executor

"""IMGEMB_EXECUTOR=ecs against moto's ECS API: dagster-aws's real `EcsRunLauncher` launches a run of
`embed_prefix` as an ECS task, and the run's real `ecs_executor` launches each step as an ECS task, all
through moto's ECS server (a subprocess on 127.0.0.1) with the deployment's config: deploy/ecs/dagster.yaml
(its storage pointed at the tests' PostgreSQL server) and deploy/ecs/code-location.env (its S3 roots
pointed at the sample dataset on local disk).

moto records every request (its request recorder), so the test reads the RunTask calls exactly as
dagster-aws sent them and shows that only the embedding step's task asks for a GPU (a `GPU` resource
requirement of IMGEMB_GPU_COUNT, on the capacity provider of IMGEMB_ECS_GPU_RUN_TASK_KWARGS), that the
run's task and every other step's task ask for no GPU and keep the launcher's CPU capacity, and that
each task carries what it needs: the run's task definition (the image and the IMGEMB_* settings),
the instance's database URL as a Secrets Manager secret, and its own DAGSTER_* step arguments.
ECS (and moto) reject a RunTask that names both a launchType and a capacityProviderStrategy; dagster-aws's
step handler sent both for every step, which dagster_wiring/location/ecs_executor.py corrects, and
every request is checked for it. The run's task definition is a copy of the daemon's task's (EcsRunLauncher
copies the task it runs in), so the IMGEMB_* settings reach runs and steps only through the daemon's task
definition: the test gives it code-location.env's variables, as a deployment must.

What moto cannot do, and what stands in for it (ecs_agent.py says more):
- moto runs no containers. `EcsAgent` plays the ECS container agent: it runs each RUNNING task's
  container command locally, with the environment the container would get, and stops the task in moto
  when the process exits. That is how the run completes here, and the Delta tables of the prefix and
  the embedding's `worker` metadata (the pid of the process the agent started for the embedding
  step's task) come from those processes.
- moto schedules nothing: no GPU is reserved (there is none here), and a capacity provider strategy is
  only recorded, as the task's capacityProviderName. A registered g5 instance lets moto place the
  tasks of a non-Fargate provider at all.
- moto keeps no exit code (every stopped container reads 0): the agent's own record of each process's
  exit code is what the test checks; dagster-aws's health checks cannot see a crashed step here.
- there is no task metadata endpoint: `TaskMetadataEndpoint` serves it. The test's own process plays
  the daemon's ECS task (a task that moto knows, which nothing runs), as EcsRunLauncher needs to find
  the task it runs in to copy its task definition, cluster and network.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._cli.job import _create_run as create_run_from_remote_job  # private: `dagster job launch`'s own
from dagster._core.launcher.base import WorkerStatus
from dagster._core.remote_representation.external import RemoteJob
from dagster._core.workspace.context import WorkspaceProcessContext, WorkspaceRequestContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, S3_PREFIX_PARTITIONS_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_assets_tests.ecs_agent import (
    ContainerRun,
    EcsAgent,
    TaskMetadataEndpoint,
    recorded_requests,
    running_moto_ecs_server,
)
from imgemb_support.location import REPO_ROOT, code_location_env
from imgemb_support.moto_server import client_environment
from imgemb_support.postgres_server import PG_URL_VARIABLE, with_postgres_storage

DEPLOY = REPO_ROOT / "deploy" / "ecs"
BIN = Path(sys.executable).parent
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/imgemb:test"
CLUSTER = "imgemb"
EMBEDDING_STEP = tables.IMAGE_EMBEDDINGS  # an asset's step key is its name
STEP_KEY_TAG = "dagster/step-key"
RUN_TIMEOUT_S = 240.0


def _env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of an env file, as ECS `environmentFiles` and `docker --env-file` read them."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _pairs(mapping: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": key, "value": value} for key, value in mapping.items()]


def _ecs_instance_config() -> dict[str, Any]:
    """deploy/ecs/dagster.yaml as shipped (EcsRunLauncher, run queue, pools), its storage at the test's PostgreSQL."""
    return with_postgres_storage(DEPLOY / "dagster.yaml")


@dataclass(frozen=True)
class EcsWorld:
    """moto's ECS and the stand-ins around it, with what the test compares the requests against."""

    location: dict[str, str]  # the code location's environment (code-location.env, roots on local disk)
    launcher_run_task_kwargs: dict[str, Any]  # dagster.yaml's run_launcher.config.run_task_kwargs
    ecs: Any
    agent: EcsAgent
    recording: Path
    subnets: list[str]
    security_groups: list[str]
    lake: Lake


def _network(ec2: Any) -> tuple[str, str]:
    """A VPC's subnet and security group for the awsvpc tasks (moto names an ENI's DNS only with DNS hostnames on)."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="imgemb-tasks", Description="imgemb tasks", VpcId=vpc)["GroupId"]
    return subnet, group


def _register_gpu_instance(ec2: Any, ecs: Any, subnet: str) -> None:
    """A g5 instance in the cluster, standing for the GPU capacity provider's Auto Scaling group: moto places a
    task of a non-Fargate capacity provider on any registered container instance, and fails without one."""
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image_id, InstanceType="g5.xlarge", MinCount=1, MaxCount=1, SubnetId=subnet)
    document = {"instanceId": instance["Instances"][0]["InstanceId"]}
    ecs.register_container_instance(cluster=CLUSTER, instanceIdentityDocument=json.dumps(document))


def _start_daemon_task(ecs: Any, location: Mapping[str, str], subnet: str, group: str) -> dict[str, Any]:
    """The task the daemon runs in, in moto: EcsRunLauncher copies its task definition (environment included)
    into each run's, and its cluster and network into each RunTask. Its container gets the code location's
    environment, as the run's process must load the location the same way the code server does."""
    definition = ecs.register_task_definition(
        family="imgemb-daemon",
        networkMode="awsvpc",
        # The run's task definition is copied from this one, and the steps reuse the run's: CPU steps run on
        # Fargate, the embedding step on the GPU provider's EC2 instances.
        requiresCompatibilities=["FARGATE", "EC2"],
        cpu="1024",
        memory="2048",
        containerDefinitions=[
            {
                "name": "daemon",
                "image": IMAGE,
                "essential": True,
                "cpu": 256,
                "memory": 1024,
                "environment": _pairs(location),
            }
        ],
    )["taskDefinition"]
    network = {"awsvpcConfiguration": {"subnets": [subnet], "securityGroups": [group], "assignPublicIp": "DISABLED"}}
    [task] = ecs.run_task(
        cluster=CLUSTER,
        taskDefinition=definition["taskDefinitionArn"],
        launchType="FARGATE",
        networkConfiguration=network,
    )["tasks"]
    return task


@pytest.fixture
def ecs_world(
    small_dataset: SampleDataset, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EcsWorld]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = _ecs_instance_config()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    location = _env_file(DEPLOY / "code-location.env") | code_location_env(small_dataset, tmp_path / "lake")
    # Not the default of 1, so that a GPU request that ignored the setting would show.
    location["IMGEMB_GPU_COUNT"] = "2"
    workdir = tmp_path / "tasks"
    workdir.mkdir()

    with ExitStack() as stack:
        endpoint = stack.enter_context(running_moto_ecs_server(tmp_path / "moto-recording.jsonl"))
        # What ECS gives every container besides its metadata URI: the region, and credentials (here moto's
        # test keys and endpoint, standing for the task role and AWS's endpoints).
        injected = client_environment(endpoint) | {"AWS_DEFAULT_REGION": location["AWS_REGION"]}
        session = boto3.Session(
            region_name=location["AWS_REGION"],
            aws_access_key_id=injected["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=injected["AWS_SECRET_ACCESS_KEY"],
        )
        ecs = session.client("ecs", endpoint_url=endpoint)
        ec2 = session.client("ec2", endpoint_url=endpoint)
        secrets = session.client("secretsmanager", endpoint_url=endpoint)

        subnet, group = _network(ec2)
        ecs.create_cluster(clusterName=CLUSTER)
        _register_gpu_instance(ec2, ecs, subnet)
        # deploy/ecs/dagster.yaml's `secrets_tag: dagster`: secrets with that tag become the runs' variables.
        secrets.create_secret(Name=PG_URL_VARIABLE, SecretString=postgres_url, Tags=[{"Key": "dagster", "Value": "1"}])
        daemon = _start_daemon_task(ecs, location, subnet, group)

        metadata = stack.enter_context(TaskMetadataEndpoint())
        # The image's ENV (Dockerfile): its Python first on PATH, DAGSTER_HOME (here the test's instance home).
        image_env = {
            "PATH": f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "DAGSTER_HOME": str(home),
        }
        agent = stack.enter_context(
            EcsAgent(
                ecs=ecs,
                secrets=secrets,
                cluster=CLUSTER,
                metadata=metadata,
                image_env=image_env,
                injected_env=injected,
                workdir=workdir,
                not_mine={daemon["taskArn"]},
            )
        )

        # This process is the daemon, in its task: the container's environment, and the metadata URI.
        for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(key, raising=False)
        daemon_env = (
            image_env
            | location
            | injected
            | {
                PG_URL_VARIABLE: postgres_url,
                "ECS_CONTAINER_METADATA_URI_V4": metadata.register(
                    daemon["clusterArn"], daemon["taskArn"], "daemon", IMAGE
                ),
                # The image runs are launched in, which the code server (`dagster code-server start`, `dagster api
                # grpc`) reads from here: without it EcsRunLauncher cannot launch a run ("Could not determine image
                # to use for the run"). code-location.env names an example ECR image; this test's stands in for it.
                "DAGSTER_CURRENT_IMAGE": IMAGE,
            }
        )
        for key, value in daemon_env.items():
            if key not in ("PATH", "HOME"):  # pytest's own, for the in-process setup and the code server
                monkeypatch.setenv(key, value)

        yield EcsWorld(
            location=location,
            launcher_run_task_kwargs=config["run_launcher"]["config"]["run_task_kwargs"],
            ecs=ecs,
            agent=agent,
            recording=tmp_path / "moto-recording.jsonl",
            subnets=[subnet],
            security_groups=[group],
            lake=Lake(str(tmp_path / "lake")),
        )


def _launch_prefix_run(instance: DagsterInstance, workspace: WorkspaceRequestContext, prefix: str) -> DagsterRun:
    """Create the `embed_prefix` run of `prefix` from the code server's job, queue it (QueuedRunCoordinator),
    and launch it as the daemon does when it dequeues a run."""
    location = workspace.get_code_location("imgemb")
    [repository] = location.get_repositories().values()
    job: RemoteJob = repository.get_full_job(PREFIX_JOB_NAME)
    # How `dagster job launch` creates a run from the code server's job (its plan, snapshots and origins).
    run = create_run_from_remote_job(
        instance, location, repository, job, {}, {"dagster/partition": prefix}, op_selection=None, run_id=None
    )
    queued = instance.submit_run(run.run_id, workspace)
    assert queued.status == DagsterRunStatus.QUEUED
    return instance.launch_run(run.run_id, workspace)


def _container_logs(agent: EcsAgent) -> str:
    return "\n".join(
        f"--- {run.task_arn} {' '.join(run.command[:3])}: exit {run.exit_code}\n{run.log.read_text()[-3000:]}"
        for run in agent.runs.values()
    )


def _wait_for_run(instance: DagsterInstance, run_id: str, agent: EcsAgent) -> DagsterRun:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        if run.is_finished and all(r.exit_code is not None for r in agent.runs.values()):
            return run
        assert not agent.errors, agent.errors
        time.sleep(0.5)
    pytest.fail(f"run {run_id} not finished after {RUN_TIMEOUT_S} s\n{_container_logs(agent)}")


def _tags(request: Mapping[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in request.get("tags", [])}


def _container_override(request: Mapping[str, Any]) -> dict[str, Any]:
    [override] = request["overrides"]["containerOverrides"]  # the `run` container, no sidecars
    return override


def _step_args(override: Mapping[str, Any]) -> ExecuteStepArgs:
    """The step arguments the step task's process reads from its environment."""
    [compressed] = [e["value"] for e in override["environment"] if e["name"] == "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"]
    return deserialize_value(zlib.decompress(base64.b64decode(compressed)).decode(), ExecuteStepArgs)


def _step_task_arns(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """step key -> the task ARN the executor reported when it launched the step ("Executing step in ECS task")."""
    arns = {}
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_WORKER_STARTING).records:
        event = record.event_log_entry.dagster_event
        arns[event.step_key] = str(event.event_specific_data.metadata["Task ARN"].value)
    return arns


@pytest.mark.slow
def test_only_the_embedding_step_task_asks_for_a_gpu_and_the_run_completes(
    small_dataset: SampleDataset, ecs_world: EcsWorld
) -> None:
    prefix = small_dataset.prefixes[0]
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [prefix])
        # embed_prefix needs the sales table: made here, in this process (it is not what is tested).
        sales_job = build_definitions(LocationSettings()).resolve_job_def(SALES_JOB_NAME)
        assert sales_job.execute_in_process(instance=instance).success

        with WorkspaceProcessContext(instance, WorkspaceFileTarget([str(REPO_ROOT / "workspace.yaml")])) as context:
            launched = _launch_prefix_run(instance, context.create_request_context(), prefix)
        run = _wait_for_run(instance, launched.run_id, ecs_world.agent)
        logs = _container_logs(ecs_world.agent)
        assert run.status == DagsterRunStatus.SUCCESS, logs

        steps_started = {
            r.event_log_entry.dagster_event.step_key
            for r in instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_START).records
        }
        step_task_arns = _step_task_arns(instance, run.run_id)
        embedding = instance.fetch_materializations(AssetKey(EMBEDDING_STEP), limit=10).records
        # The run's own task: the launcher tagged the run with it, and monitoring finds it stopped, not failed.
        run_task_arn = run.tags["ecs/task_arn"]
        assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.SUCCESS

    # --- the RunTask requests, as moto received them ---------------------------------------------
    run_tasks = [
        r for r in recorded_requests(ecs_world.recording, "RunTask") if _tags(r).get("dagster/run_id") == run.run_id
    ]
    run_requests = [r for r in run_tasks if STEP_KEY_TAG not in _tags(r)]
    step_requests = {_tags(r)[STEP_KEY_TAG]: r for r in run_tasks if STEP_KEY_TAG in _tags(r)}
    assert len(run_requests) == 1, run_requests
    assert len(step_requests) == len(run_tasks) - 1, "one task per step, none relaunched"
    assert set(step_requests) == steps_started and EMBEDDING_STEP in steps_started, (set(step_requests), steps_started)

    [run_request] = run_requests
    [run_task] = ecs_world.ecs.describe_tasks(cluster=CLUSTER, tasks=[run_task_arn])["tasks"]
    run_definition = ecs_world.ecs.describe_task_definition(taskDefinition=run_task["taskDefinitionArn"])[
        "taskDefinition"
    ]
    gpu_strategy = json.loads(ecs_world.location["IMGEMB_ECS_GPU_RUN_TASK_KWARGS"])["capacityProviderStrategy"]
    cpu_strategy = ecs_world.launcher_run_task_kwargs["capacityProviderStrategy"]
    assert gpu_strategy != cpu_strategy

    for name, request in [("run", run_request), *step_requests.items()]:
        override = _container_override(request)
        wants_gpu = name == EMBEDDING_STEP
        # Only the embedding step asks for GPUs, as many as IMGEMB_GPU_COUNT, on the GPU capacity provider;
        # the run and every other step keep the launcher's CPU capacity.
        expected_requirements = (
            [{"type": "GPU", "value": ecs_world.location["IMGEMB_GPU_COUNT"]}] if wants_gpu else None
        )
        assert override.get("resourceRequirements") == expected_requirements, (name, override)
        assert request.get("capacityProviderStrategy") == (gpu_strategy if wants_gpu else cpu_strategy), (name, request)
        # ECS rejects a RunTask that names both a launch type and a capacity provider strategy.
        assert "launchType" not in request, (name, request)
        # Same cluster and network as the daemon's own task.
        assert request["cluster"] == run_task["clusterArn"]
        vpc = request["networkConfiguration"]["awsvpcConfiguration"]
        assert (vpc["subnets"], vpc["securityGroups"]) == (ecs_world.subnets, ecs_world.security_groups), (name, vpc)
        # ECS limits a task's overrides to 8192 characters; moto does not check.
        assert len(json.dumps(request["overrides"], separators=(",", ":"))) <= 8192, name

    # The run's task: the code server's image, `dagster api execute_run` for this run.
    assert run_request["taskDefinition"] == run_definition["family"]
    assert _container_override(run_request)["command"][-3:-1] == ["api", "execute_run"]
    assert run.run_id in _container_override(run_request)["command"][-1]
    # Each step's task: the run's own task definition, `dagster api execute_step`, and its step arguments
    # in DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS (the only variable the executor adds).
    for step, request in step_requests.items():
        override = _container_override(request)
        assert request["taskDefinition"] == run_task["taskDefinitionArn"], step
        assert override["command"][-2:] == ["api", "execute_step"], step
        assert [e["name"] for e in override["environment"]] == ["DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"], step
        args = _step_args(override)
        assert (args.run_id, list(args.step_keys_to_execute or [])) == (run.run_id, [step])

    # What the run's and steps' task definition gives their container: the image, every setting of
    # code-location.env, and the instance's database URL as the tagged secret.
    [container] = run_definition["containerDefinitions"]
    assert container["image"] == IMAGE
    environment = {e["name"]: e["value"] for e in container["environment"]}
    missing = {k: v for k, v in ecs_world.location.items() if environment.get(k) != v}
    assert not missing, missing
    assert [s["name"] for s in container.get("secrets", [])] == [PG_URL_VARIABLE]

    # --- what the agent ran -------------------------------------------------------------------------
    ran: dict[str, ContainerRun] = dict(ecs_world.agent.runs)
    assert set(ran) == {run_task_arn, *step_task_arns.values()}, logs
    assert all(r.exit_code == 0 for r in ran.values()), logs
    assert set(step_task_arns) == steps_started
    for step, arn in step_task_arns.items():
        assert ran[arn].gpus == (int(ecs_world.location["IMGEMB_GPU_COUNT"]) if step == EMBEDDING_STEP else 0)
        [task] = ecs_world.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"]
        assert task["lastStatus"] == "STOPPED" and "exit code 0" in task["stoppedReason"], task
        assert (task.get("capacityProviderName") == gpu_strategy[0]["capacityProvider"]) == (step == EMBEDDING_STEP)

    # --- the tables of the prefix, written by the step tasks' processes --------------------------
    images, broken = small_dataset.image_ids[prefix], small_dataset.broken_files[prefix]
    counts = {name: ecs_world.lake.read(name, prefix).num_rows for name in tables.ALL_TABLES if name != tables.SALES}
    assert counts == {
        tables.RAW_IMAGE_MANIFEST: len(images) + len(broken),
        tables.DOWNSCALED_IMAGES: len(images),
        tables.REJECTED_IMAGES: len(broken),
        tables.IMAGES_WITH_SALES: small_dataset.expected_joined(prefix),
        tables.IMAGE_EMBEDDINGS: small_dataset.expected_joined(prefix),
    }
    # The embedding was computed by the process the agent started for the embedding step's GPU task.
    [record] = [r for r in embedding if r.partition_key == prefix]
    worker = str(record.asset_materialization.metadata["worker"].value)
    assert worker.rsplit(":", 1)[-1] == str(ran[step_task_arns[EMBEDDING_STEP]].pid), (worker, logs)

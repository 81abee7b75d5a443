"""Stand-ins for the parts of Amazon ECS that moto cannot be, for tests that drive dagster-aws's real
`EcsRunLauncher` and `ecs_executor` against moto's ECS API (a moto server subprocess on 127.0.0.1).

What moto's ECS server is: the API's bookkeeping. It keeps clusters, task definitions, container
instances and tasks with the overrides, tags and network configuration each RunTask asked for, and it
rejects some invalid requests (a launchType together with a capacityProviderStrategy, an awsvpc task
without a networkConfiguration). What it is not:
- it runs no containers: a task is a record, RUNNING until someone calls StopTask;
- it schedules nothing: a GPU resourceRequirement is stored and never reserved or checked, and a
  capacity provider strategy only becomes the task's capacityProviderName (a non-Fargate provider needs
  some registered container instance, whatever its provider);
- it cannot record an exit code: every container of a STOPPED task reads exitCode 0, because the
  agent's SubmitTaskStateChange / SubmitContainerStateChange calls are not implemented;
- there is no task metadata endpoint (`ECS_CONTAINER_METADATA_URI_V4`), which dagster-aws reads to
  find the task it runs in.

So this module provides:
- `running_moto_ecs_server`: moto's server with its request recorder on (every API request it
  receives, as sent, in a JSON-lines file) and ECS tasks held RUNNING until StopTask (moto's default
  moves a task one status further on every DescribeTasks, so a polled task would stop by itself);
- `TaskMetadataEndpoint`: the task metadata endpoint v4, for the tasks registered with it;
- `EcsAgent`: the ECS container agent, the one thing that cannot exist here. It polls moto for RUNNING
  tasks and runs each task's container as a local subprocess: the command from the task's container
  overrides (else the task definition's), the environment a container would get (the image's, then
  the task definition's, then its secrets resolved from Secrets Manager, then the overrides', then
  what ECS itself injects: region, metadata endpoint and credentials). When the process exits it stops
  the task in moto, with the exit code in the stop reason (moto keeps no exit code, see above); a task
  stopped by someone else has its process terminated, as the agent would.
- `recorded_requests`: the recorded requests of one ECS action, as parsed JSON bodies.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from imgemb_support.moto_server import free_port, stop, wait_until_listening

ECS_TARGET_PREFIX = "AmazonEC2ContainerServiceV20141113."
POLL_S = 0.2


# --- moto's server, recording --------------------------------------------------------------------


@contextmanager
def running_moto_ecs_server(recording: Path) -> Iterator[str]:
    """The URL of a moto server subprocess that records every request into `recording`; stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto_server = Path(sys.executable).with_name("moto_server")
    env = {**os.environ, "MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(recording)}
    process = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        cwd=recording.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_listening(f"{url}/moto-api/", process)
        # Tasks keep the status they are given: RUNNING from RunTask, STOPPED from StopTask.
        _post_json(
            f"{url}/moto-api/state-manager/set-transition",
            {"model_name": "ecs::task", "transition": {"progression": "manual", "times": sys.maxsize}},
        )
        yield url
    finally:
        stop(process)


def _post_json(url: str, body: Mapping[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def recorded_requests(recording: Path, action: str) -> list[dict[str, Any]]:
    """The JSON bodies of the ECS `action` requests (e.g. "RunTask") the server received, in order."""
    requests = []
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        if entry["headers"].get("X-Amz-Target") != ECS_TARGET_PREFIX + action:
            continue
        body = base64.b64decode(entry["body"]) if entry.get("body_encoded") else entry["body"]
        requests.append(json.loads(body))
    return requests


# --- the task metadata endpoint ------------------------------------------------------------------


@dataclass(frozen=True)
class _TaskMetadata:
    cluster_arn: str
    task_arn: str
    container_name: str
    image: str


class TaskMetadataEndpoint:
    """ECS's task metadata endpoint v4 on 127.0.0.1, answering for the tasks registered with it.

    `register` gives the URI that ECS would put in the container's `ECS_CONTAINER_METADATA_URI_V4`:
    GET on it answers the container's metadata, GET on `<uri>/task` the task's. Only the fields that
    clients read are served (dagster-aws reads `Name`, `Cluster` and `TaskARN`).
    """

    def __init__(self) -> None:
        self._tasks: dict[str, _TaskMetadata] = {}
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                body = endpoint.answer(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body or {}).encode())

            def log_message(self, format: str, *args: Any) -> None:  # http.server's name
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="task-metadata", daemon=True)

    def __enter__(self) -> TaskMetadataEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def register(self, cluster_arn: str, task_arn: str, container_name: str, image: str) -> str:
        """The metadata URI of the container `container_name` of the task `task_arn`."""
        key = f"{task_arn.rsplit('/', 1)[-1]}-{container_name}"
        self._tasks[key] = _TaskMetadata(cluster_arn, task_arn, container_name, image)
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v4/{key}"

    def answer(self, path: str) -> dict[str, Any] | None:
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "v4" or parts[1] not in self._tasks:
            return None
        task = self._tasks[parts[1]]
        container = {
            "DockerId": parts[1],
            "Name": task.container_name,
            "Image": task.image,
            "KnownStatus": "RUNNING",
            "Labels": {"com.amazonaws.ecs.cluster": task.cluster_arn, "com.amazonaws.ecs.task-arn": task.task_arn},
        }
        if parts[2:] == []:
            return container
        if parts[2:] == ["task"]:
            return {
                "Cluster": task.cluster_arn,
                "TaskARN": task.task_arn,
                "KnownStatus": "RUNNING",
                "DesiredStatus": "RUNNING",
                "Containers": [container],
            }
        return None


# --- the container agent -------------------------------------------------------------------------


@dataclass
class ContainerRun:
    """One task's container as the agent ran it."""

    task_arn: str
    container: str
    command: list[str]
    gpus: int  # what the task asked for; nothing here reserves it
    log: Path
    process: subprocess.Popen
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class EcsAgent:
    """Runs the RUNNING tasks of `cluster` as local processes (see the module docstring).

    `image_env` stands for the image's ENV (PATH to its Python, DAGSTER_HOME, ...), `injected_env` for
    what ECS adds to every container besides the metadata URI (region, credentials; here also the
    moto endpoint). Tasks in `not_mine` are never run: they stand for processes that already exist
    (the test's own process plays the daemon's task).
    """

    ecs: Any
    secrets: Any
    cluster: str
    metadata: TaskMetadataEndpoint
    image_env: Mapping[str, str]
    injected_env: Mapping[str, str]
    workdir: Path
    not_mine: set[str] = field(default_factory=set)
    runs: dict[str, ContainerRun] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ecs-agent", daemon=True)

    def __enter__(self) -> EcsAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        with self._lock:
            for run in self.runs.values():
                if run.process.poll() is None:
                    _terminate(run.process)

    def finished(self) -> list[ContainerRun]:
        with self._lock:
            return [run for run in self.runs.values() if run.exit_code is not None]

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep agenting; the test reports what went wrong
                self.errors.append(repr(exc))
            self._stopping.wait(POLL_S)

    def _tick(self) -> None:
        running = self.ecs.list_tasks(cluster=self.cluster, desiredStatus="RUNNING")["taskArns"]
        for arn in running:
            if arn not in self.runs and arn not in self.not_mine:
                [task] = self.ecs.describe_tasks(cluster=self.cluster, tasks=[arn])["tasks"]
                run = self._start(task)
                with self._lock:
                    self.runs[arn] = run
        for arn, run in list(self.runs.items()):
            if run.exit_code is not None:
                continue
            if arn not in running:  # stopped through the API (StopTask): the agent kills the container
                _terminate(run.process)
            code = run.process.poll()
            if code is None:
                continue
            if arn in running:
                # moto cannot store the exit code: it goes into the reason, and stays in `runs`.
                self.ecs.stop_task(
                    cluster=self.cluster, task=arn, reason=f"Essential container in task exited (exit code {code})"
                )
            with self._lock:
                run.exit_code = code

    def _start(self, task: Mapping[str, Any]) -> ContainerRun:
        definition = self.ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
        # dagster-aws's task definitions hold one container unless sidecars are included.
        container = definition["containerDefinitions"][0]
        name = container["name"]
        overrides = next((o for o in task.get("overrides", {}).get("containerOverrides", []) if o["name"] == name), {})
        command = [*container.get("entryPoint", []), *(overrides.get("command") or container.get("command") or [])]
        metadata_uri = self.metadata.register(task["clusterArn"], task["taskArn"], name, container["image"])
        environment = {
            **self.image_env,
            **_pairs(container.get("environment", [])),
            **{s["name"]: self._secret(s["valueFrom"]) for s in container.get("secrets", [])},
            **_pairs(overrides.get("environment", [])),
            **self.injected_env,
            "ECS_CONTAINER_METADATA_URI_V4": metadata_uri,
        }
        gpus = sum(int(r["value"]) for r in overrides.get("resourceRequirements", []) if r["type"] == "GPU")
        task_id = task["taskArn"].rsplit("/", 1)[-1]
        log = self.workdir / f"task-{task_id}.log"
        process = subprocess.Popen(
            command,
            env=environment,
            cwd=self.workdir,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return ContainerRun(task["taskArn"], name, command, gpus, log, process)

    def _secret(self, value_from: str) -> str:
        return self.secrets.get_secret_value(SecretId=value_from)["SecretString"]


def _pairs(items: Sequence[Mapping[str, str]]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in items}


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM the container's process group, SIGKILL it after 10 s (as `docker stop` does)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    except ProcessLookupError:
        pass

"""The ECS step executor: dagster-aws's `ecs_executor`, with a fix so step tasks can use capacity providers.

Imported only when IMGEMB_EXECUTOR=ecs. It builds on dagster-aws internals (the
step handler's `_run_task`, the executor's creation body as of dagster-aws 0.29.27):
recheck it when upgrading dagster-aws, and drop it once upstream stops copying the
launch type into step tasks.
"""

from typing import Any

import dagster as dg
from dagster._core.execution.retries import RetryMode
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import StepDelegatingExecutor
from dagster_aws.ecs.executor import EcsStepHandler, ecs_executor
from dagster_aws.ecs.launcher import EcsRunLauncher


class CapacityProviderEcsStepHandler(EcsStepHandler):
    """Leaves the launch type out of a step's RunTask that names a capacity provider strategy."""

    def _run_task(self, **run_task_kwargs: Any) -> Any:
        if run_task_kwargs.get("capacityProviderStrategy"):
            run_task_kwargs.pop("launchType", None)
        return super()._run_task(**run_task_kwargs)


def ecs_capacity_provider_executor() -> dg.ExecutorDefinition:
    """dagster-aws's `ecs_executor` (same name, config and behaviour), whose step tasks may use capacity providers.

    The step handler copies the launch type of the run's own task (`FARGATE` when it has none) into
    every step's RunTask, then merges the run launcher's and the step's `run_task_kwargs` over it, and
    never drops the launch type again. ECS rejects a RunTask that names both a launch type and a
    capacity provider strategy ("Specifying both a launch type and capacity provider strategy is not
    supported"), so every step failed to launch once a capacity provider strategy was set: the GPU
    step's from IMGEMB_ECS_GPU_RUN_TASK_KWARGS, or every step's from the run launcher's
    run_task_kwargs (deploy/ecs/dagster.yaml). As EcsRunLauncher already does for the run's task, the
    strategy wins and the launch type is left out.
    """

    def create(init_context: InitExecutorContext) -> Executor:
        # The body of dagster-aws's ecs_executor, with the handler above.
        run_launcher = init_context.instance.run_launcher
        if not isinstance(run_launcher, EcsRunLauncher):
            raise dg.DagsterInvariantViolationError(
                "the ecs executor needs runs launched in ECS tasks by the EcsRunLauncher"
            )
        config = init_context.executor_config
        handler = CapacityProviderEcsStepHandler(
            run_launcher=run_launcher,
            run_task_kwargs=config.get("run_task_kwargs"),  # type: ignore[arg-type]
            cpu=config.get("cpu"),  # type: ignore[arg-type]
            memory=config.get("memory"),  # type: ignore[arg-type]
            ephemeral_storage=config.get("ephemeral_storage"),  # type: ignore[arg-type]
            task_overrides=config.get("task_overrides"),  # type: ignore[arg-type]
        )
        return StepDelegatingExecutor(
            handler,
            retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
            max_concurrent=config.get("max_concurrent"),  # type: ignore[arg-type]
            tag_concurrency_limits=config.get("tag_concurrency_limits"),  # type: ignore[arg-type]
            should_verify_step=True,
            step_dependency_config=StepDependencyConfig.from_config(config.get("step_dependency_config")),  # type: ignore[arg-type]
        )

    return dg.ExecutorDefinition(
        name=ecs_executor.name,
        config_schema=ecs_executor.config_schema,  # type: ignore[arg-type]  # Dagster's own executor's schema, as it is
        requirements=ecs_executor.get_requirements,
        executor_creation_fn=create,
        description=ecs_executor.description,
    )

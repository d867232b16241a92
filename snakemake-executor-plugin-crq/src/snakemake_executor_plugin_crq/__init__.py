"""Snakemake executor plugin for crq: ``snakemake --executor crq --jobs 100``.

Jobs go to the queue ``crq`` would use (``--crq-server``/``--crq-queue``, else CRQ_SERVER,
CRQ_QUEUE, the registry) in one idempotent batch per scheduling round, and every active job is
checked with one request a round; a round that cannot reach the server (crash recovery, a
failover, an outage) reports its jobs as still running and tries again next round."""

import hashlib
import os
import secrets
import shlex
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from crq.client import Client, CrqError
from crq.client.environ import PRIVATE_ENV
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import (
    CommonSettings,
    ExecutorSettingsBase,
)

from crq import wire
from snakemake_executor_plugin_crq.mapping import crq_resources, time_limit

#: Submits ride out crash recovery and a failover for this long before the workflow fails.
SUBMIT_RETRY_FOR = 600.0
#: Rounds in a row a job may be missing from the server's answer before it counts as failed
#: (forgotten by autoforget, or the queue was reset).
MISSING_ROUNDS = 3
FAILED = frozenset({wire.FAILED, wire.STOPPED, wire.LOST})


@dataclass
class ExecutorSettings(ExecutorSettingsBase):  # type: ignore[misc]  # untyped interface
    # Optional[...], not X | None: Snakemake reads the field types at run time for argparse
    server: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata={"help": "crq server URL (default: as crq finds it: CRQ_SERVER, CRQ_QUEUE, "
                  "the registry)", "env_var": False, "required": False},
    )  # fmt: skip
    queue: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata={"help": "crq queue name (default: CRQ_QUEUE, else vnc)", "required": False},
    )
    status_interval: float = field(
        default=0.5,
        metadata={"help": "seconds between status rounds (each is one request)",
                  "required": False},
    )  # fmt: skip
    priority: Optional[int] = field(  # noqa: UP045
        default=None, metadata={"help": "crq priority of the jobs (1-15)", "required": False}
    )
    wrap: bool = field(
        default=False,
        metadata={"help": "run every job through a snakemake process of its own, as the "
                  "generic cluster executor does (default: a plain shell rule runs its "
                  "command directly)", "required": False},
    )  # fmt: skip


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=False,  # the job gets the submitter's whole environment
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=1,  # the wait thread starts before __post_init__
)


def _plain_shell(job: Any) -> bool:
    """A ``shell:`` rule with nothing a per-job snakemake would have to set up."""
    try:
        return bool(
            not job.is_group()
            and job.is_shell
            and job.shellcmd
            and not job.conda_env_spec
            and not job.container_img_url
            and not job.env_modules
            and job.rule.shadow_depth is None
            and not job.benchmark
        )
    except Exception:  # an interface of another Snakemake: the wrapper is always right
        return False


class Executor(RemoteExecutor):  # type: ignore[misc]  # untyped interface
    def __post_init__(self) -> None:
        settings: ExecutorSettings | None = self.workflow.executor_settings
        self.settings = settings or ExecutorSettings()
        try:
            # one client a thread: run_jobs (the scheduler) and the status rounds
            self.submitter = Client(url=self.settings.server, queue=self.settings.queue)
            self.checker = Client(url=self.settings.server, queue=self.settings.queue)
        except CrqError as e:
            raise WorkflowError(f"crq: {e}") from e
        self.submitter.notify = self.logger.warning
        #: this workflow run: with a job's id and attempt, the submit's idempotency key
        self.run_id = secrets.token_hex(8)
        self.workdir = os.getcwd()
        self.log_dir = Path(self.workdir, ".snakemake", "crq_logs")
        self.env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        self.env["PWD"] = self.workdir
        self.missing: dict[int, int] = {}
        self.next_seconds_between_status_checks = self.settings.status_interval

    # -- submit -------------------------------------------------------------------------

    def _log_path(self, job: JobExecutorInterface) -> Path:
        wildcards = str(job.format_wildcards("{wildcards}")) if not job.is_group() else ""
        name = "_".join(part for part in (str(job.jobid), wildcards) if part).replace("/", "_")
        return self.log_dir / str(job.name) / f"{name}.{job.attempt}.log"

    def _spec(self, job: JobExecutorInterface, log: Path) -> dict[str, Any]:
        try:
            resources = crq_resources(job.threads, job.resources)
        except ValueError as e:
            raise WorkflowError(f"crq: rule {job.name}: {e}") from e
        spec: dict[str, Any] = {
            "command": self._command(job),
            "cwd": self.workdir,
            "name": f"smk-{job.name}-{job.jobid}",
            "resources": resources,
            "log": str(log),
        }
        limit = time_limit(job.resources)
        if limit is not None:
            spec["time_limit"] = limit
        if self.settings.priority is not None:
            spec["priority"] = self.settings.priority
        return spec

    def _command(self, job: JobExecutorInterface) -> str:
        """A plain shell rule's own command, else a snakemake process for the job.

        A snakemake process per job costs a Python start-up and the workflow's parse (1-2 s
        of CPU) for a job that may run 1 s; the command Snakemake itself would run for a
        ``shell:`` rule costs a bash. What that process does besides (conda, containers,
        modules, shadow dirs, benchmarks, ``run:``/``script:`` code) keeps the wrapper; the
        outputs are checked by this snakemake either way."""
        if self.settings.wrap or not _plain_shell(job):
            return str(self.format_job_exec(job))
        dirs = {os.path.dirname(str(f)) for f in [*job.output, *job.log]} - {""}
        mkdir = f"mkdir -p {' '.join(map(shlex.quote, sorted(dirs)))}; " if dirs else ""
        return "bash -c " + shlex.quote(f"set -euo pipefail; {mkdir}{job.shellcmd}")

    def _key(self, jobs: list[JobExecutorInterface]) -> str:
        """The batch's idempotency key, from the run and its jobs (id and attempt): a retried
        submit of the same batch is the same request to the server."""
        parts = "\n".join(f"{j.jobid}.{j.attempt}" for j in jobs)
        return "smk-" + hashlib.sha256(f"{self.run_id}\n{parts}".encode()).hexdigest()[:48]

    def run_jobs(self, jobs: list[JobExecutorInterface]) -> None:
        """All the jobs ready in this round in one request."""
        if not jobs:
            return
        for job in jobs:
            self.run_job_pre(job)
        logs = [self._log_path(job) for job in jobs]
        for log in logs:
            log.parent.mkdir(parents=True, exist_ok=True)
        specs = [self._spec(job, log) for job, log in zip(jobs, logs, strict=True)]
        try:
            ids = self.submitter.submit_many(
                specs, env=self.env, idempotency_key=self._key(jobs), retry_for=SUBMIT_RETRY_FOR
            )
        except CrqError as e:
            raise WorkflowError(f"crq: submit failed: {e}") from e
        for job, log, jid in zip(jobs, logs, ids, strict=True):
            info = SubmittedJobInfo(job, external_jobid=str(jid), aux={"log": str(log)})
            self.report_job_submission(info)

    def run_job(self, job: JobExecutorInterface) -> None:
        self.run_jobs([job])

    # -- status -------------------------------------------------------------------------

    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        ids = [int(str(info.external_jobid)) for info in active_jobs]
        try:
            async with self.status_rate_limiter:
                states = self.checker.states(ids)
        except CrqError as e:
            # recovery, a failover, an outage: the jobs run on; ask again next round
            self.logger.warning(f"crq: status unknown this round ({e}); retrying")
            for info in active_jobs:
                yield info
            return
        for info, jid in zip(active_jobs, ids, strict=True):
            state = states.get(jid)
            aux_logs = [info.aux["log"]] if info.aux else []
            if state is None:
                self.missing[jid] = self.missing.get(jid, 0) + 1
                if self.missing[jid] < MISSING_ROUNDS:
                    yield info
                    continue
                self.report_job_error(info, msg=f"crq job {jid} is gone. ", aux_logs=aux_logs)
            elif state == wire.DONE:
                self.report_job_success(info)
            elif state in FAILED:
                msg = f"crq job {jid} ended {state} (log: {aux_logs[0] if aux_logs else '-'}). "
                self.report_job_error(info, msg=msg, aux_logs=aux_logs)
            else:
                yield info
            if state is not None:
                self.missing.pop(jid, None)

    # -- cancel -------------------------------------------------------------------------

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        for info in active_jobs:
            try:
                self.submitter.stop(int(str(info.external_jobid)))
            except CrqError as e:
                if e.status != 404:
                    self.logger.warning(f"crq: could not stop job {info.external_jobid}: {e}")

    def shutdown(self) -> None:
        super().shutdown()
        self.submitter.close()
        self.checker.close()

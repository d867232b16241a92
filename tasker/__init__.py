"""crq's tasker (``vovtasker``): runs jobs on a compute host for a queue server.

Modules: ``statedir`` (durable local state), ``procs`` (the job wrapper among the host's
processes), ``runner`` (spawn, reap, kill, adopt), ``outbox`` (reports not acked yet),
``link`` (where the server is, how a request fails), ``agent`` (the register/sync loop),
``cli`` (the command). Only the standard library (HTTP through ``crq.http11``), so it
starts fast and installs anywhere the jobs run.
"""

from crq import __version__

__all__ = ["__version__"]

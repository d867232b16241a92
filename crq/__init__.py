"""crq: a job-queue server that survives its own crash.

The distribution installs one import name. ``crq.server``, ``crq.tasker`` and
``crq.client`` live in the repository's top-level folders ``server/``, ``tasker/`` and
``client/`` (setuptools ``package-dir`` puts them inside this package when installed);
this folder holds what all three share, importing only the standard library: ``wire``
(names and message shapes), ``durable`` (atomic files, pid locks) and ``procfs``.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# A source checkout (tests with PYTHONPATH=<repo>, `python -m crq.server` from the repo)
# has server/, tasker/ and client/ beside this folder, not in it: look there too.
_here = os.path.dirname(os.path.abspath(__file__))
_repo = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "server")) and os.path.isfile(
    os.path.join(_repo, "server", "__init__.py")
):
    __path__.append(_repo)

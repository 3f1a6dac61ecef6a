"""End-to-end recipes on top of every stage: ``medseg demo`` and the environment report of ``medseg info``.

``apps`` owns what strings the stages together for a user: :func:`run_demo` (synthetic or real
data -> plan -> train -> predict -> evaluate -> report, in minutes on a CPU) and
:func:`environment_report` (versions, device, optional extras). Only the CLI sits above it.
"""

from __future__ import annotations

__all__ = ["run_demo", "environment_report"]


def __getattr__(name: str):  # PEP 562: the demo imports torch, the environment report does not
    if name == "run_demo":
        from medseg.apps.demo import run_demo

        return run_demo
    if name == "environment_report":
        from medseg.apps.environment import environment_report

        return environment_report
    raise AttributeError(f"module 'medseg.apps' has no attribute {name!r}")

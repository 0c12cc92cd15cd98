"""Temporal workflows and the control plane's activities: spill out, spill back, sweep leaks.

Workflow modules import only :mod:`workflows.types` and ``temporalio`` into the sandbox; the
activities (:mod:`workflows.activities`) and the process wiring (:mod:`workflows.host`) run in
the scheduler process.
"""

"""Temporal workflows and the control plane's activities: spill out, spill back, sweep leaks.

Workflow modules import only :mod:`workflows.types`, :mod:`decisions.plantypes` and
``temporalio`` into the sandbox; the activities (:mod:`workflows.activities`) run in the
scheduler process, which :mod:`spillway.serve.control_plane` composes. Every decision an
activity carries out is made in :mod:`decisions`; this package only orchestrates.
"""

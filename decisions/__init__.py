"""Every decision Spillway makes, as pure functions over plain values.

- :mod:`decisions.policy`: the policy file's models (what may spill, where, at what cost) and
  the residency lock.
- :mod:`decisions.fleetview`: the frozen fleet snapshot every decision reads.
- :mod:`decisions.autoscale`: how many replicas a deployment wants, from its signal.
- :mod:`decisions.placement`: where new replicas go (free reserved GPUs, then cloud offers
  inside the lock) and which leave first.
- :mod:`decisions.planning`: one planning step combining both, with failover lists
  (:mod:`decisions.plantypes` holds its inputs and outputs).
- :mod:`decisions.preview`: ``spillway plan``'s account of what a sustained load would cause.

Callers: the deployment workflow's planning activity, the simulator, the CLI and (for
routing) the gateway: they all call the same code, so a decision can be replayed and tested
without any server. Nothing here does I/O, reads a clock, or imports Temporal, gRPC or a cloud
SDK; it may import :mod:`providers` (the catalog data and error types, no SDK) and
:mod:`common`.
"""

"""The long-running processes ``spillway`` starts, each composed from the packages below.

- :mod:`spillway.serve.scheduler`: the gRPC server and fleet state, and, with a policy file,
  the control plane (:mod:`spillway.serve.control_plane`: the Temporal worker for the
  workflows and control activities, the policy store, the cloud providers built from config).
- :mod:`spillway.serve.agent`: GPU discovery, the replica supervisor, the reporter and the node
  worker.

Composition only: what each part does lives in its own package (``scheduler``, ``workflows``,
``agent``, ``providers``); these modules read config, build the parts, start them, and stop
them in order on SIGTERM.
"""

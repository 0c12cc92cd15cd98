"""The data plane: one OpenAI-compatible HTTP endpoint in front of every deployment.

An application points its OpenAI (or SGLang) client at the gateway and nothing else. For each
request the gateway finds the deployment (by the ``model`` field or the path prefix), builds an
immutable view of the deployment's targets (replicas from the scheduler's fleet watch, managed
endpoints from the policy, the in-flight counts it keeps itself), asks
:func:`decisions.routing.route` where the request goes, and proxies the body there unchanged:
reserved replicas first, then rented ones, then managed endpoints, then a bounded queue. What it
sees (queue, overflow, tokens per tier) goes back to the scheduler as autoscaling signals.

Modules: ``config`` (gateway.yaml), ``fleet`` (the watch on the scheduler and the traffic
reports), ``targets`` (policy and fleet to routing targets, warm-up, in-flight counting),
``queue`` (the bounded wait queue), ``proxy`` (forwarding, retries, cancellation), ``metrics``
(Prometheus), ``app`` (the aiohttp application and its handlers).

What it must not do: decide a tier, a residency question or a replica by itself (every choice is
``route()``'s), re-serialise a body (except to rename the model for a managed endpoint that
serves it under another name), let a scheduler outage stop traffic (it keeps the last fleet and
checks replica health itself), or need Temporal, a cloud SDK or the scheduler's code: it runs
in the customer's VPC with the ``gateway`` extra alone.
"""

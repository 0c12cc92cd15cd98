"""The ``spillway`` command. Each subcommand imports what it needs only when it runs, so that
``spillway agent run`` works on a node that has only the ``agent`` extra installed.

Exit codes: 0 success, 1 runtime failure, 2 bad input (config file, arguments, credentials);
``spillway prefetch`` adds 3 not found, 4 access denied, 5 verification failed, 6 disk full,
7 origin changed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.schedulerlink import ClientTls
    from common.v1 import agent_pb2

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_agent_run(args: argparse.Namespace) -> int:
    from spillway.serve.agent import run_agent

    asyncio.run(run_agent(args.config))
    return 0


def _cmd_scheduler_run(args: argparse.Namespace) -> int:
    from spillway.serve.scheduler import run_scheduler

    asyncio.run(run_scheduler(args.config))
    return 0


def _cmd_gateway_run(args: argparse.Namespace) -> int:
    from spillway.serve.gateway import main as run_gateway

    run_gateway(args.config)
    return 0


def _status_targets(args: argparse.Namespace) -> tuple[list[str], ClientTls | None]:
    """The schedulers to ask, in order, and the TLS settings: ``--scheduler`` (repeatable),
    else ``--config``'s list, else ``$SPILLWAY_SCHEDULER`` (commas between several)."""
    from common.schedulerlink import ClientTls, check_host_port
    from spillway.status import schedulers_of

    tls: ClientTls | None = None
    if args.scheduler:
        addresses = list(args.scheduler)
    elif args.config is not None:
        found, tls = schedulers_of(args.config)
        addresses = list(found)
    else:
        env = os.environ.get("SPILLWAY_SCHEDULER", "127.0.0.1:50051")
        addresses = [a.strip() for a in env.split(",") if a.strip()]
    for address in addresses:
        try:
            check_host_port(address)
        except ValueError as exc:
            raise _BadInput(f"--scheduler {address}: {exc}") from None
    if len(set(addresses)) != len(addresses):
        raise _BadInput(f"--scheduler: a scheduler is listed twice: {', '.join(addresses)}")
    if args.ca_file:
        tls = ClientTls(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return addresses, tls


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from common.schedulerlink import read_token
    from spillway.status import NoSchedulerAnswered, fetch_fleet_from, fleet_json, render

    if args.token_file is None:
        raise _BadInput("--token-file (or SPILLWAY_TOKEN_FILE) is required: an operator token")
    token = read_token(args.token_file)
    addresses, tls = _status_targets(args)

    async def once() -> tuple[str, agent_pb2.GetFleetResponse]:
        try:
            return await fetch_fleet_from(addresses, token, tls)
        except NoSchedulerAnswered as exc:
            raise _Failure(str(exc)) from exc

    if args.json:
        address, fleet = asyncio.run(once())
        data = fleet_json(fleet)
        data["answered_by"] = address
        print(json.dumps(data, indent=2))
        return 0
    console = Console() if sys.stdout.isatty() else Console(width=150)
    if args.watch is None:
        address, fleet = asyncio.run(once())
        console.print(render(fleet, address=address))
        return 0

    async def watch() -> None:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                address, fleet = await once()
                live.update(render(fleet, address=address), refresh=True)
                await asyncio.sleep(args.watch)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch())
    return 0


def _cmd_token_new(args: argparse.Namespace) -> int:
    from scheduler.auth import add_token

    token = add_token(args.tokens_file, args.id, args.role)
    if args.out is None:
        print(token)
    else:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        print(f"wrote the token for {args.role} {args.id!r} to {args.out}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spillway.demo import run_demo

    return run_demo(seconds=args.seconds)


def _cmd_offers(args: argparse.Namespace) -> int:
    from rich.console import Console

    from providers.errors import ProviderError
    from providers.ranking import explain_empty, offers_json, offers_table, rank

    try:
        request, offers = rank(
            args.sku,
            residency=[g for value in args.residency for g in value.split(",") if g],
            clouds=[c for value in args.cloud for c in value.split(",") if c],
            regions=[r for value in args.region for r in value.split(",") if r],
            max_usd_per_hour=args.max_price,
        )
    except ProviderError as exc:
        raise _BadInput(str(exc)) from exc
    if args.json:
        print(json.dumps(offers_json(offers[: args.limit] if args.limit else offers), indent=2))
        return 0 if offers else EXIT_FAILURE
    if not offers:
        raise _Failure(explain_empty(request))
    console = Console() if sys.stdout.isatty() else Console(width=150)
    console.print(offers_table(request, offers, args.limit))
    return 0


def _cmd_prefetch(args: argparse.Namespace) -> int:
    from agent.prefetch.cli import run

    return run(args)


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from decisions.policycheck import check_policy

    result = check_policy(args.file)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for error in result.errors:
        print(f"spillway: error: {error}", file=sys.stderr)
    if result.errors:
        return EXIT_BAD_INPUT
    print(f"{args.file}: valid")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import time

    import grpc

    from common.schedulerlink import read_token
    from common.v1 import agent_pb2 as pb
    from decisions.policycheck import load_policy
    from decisions.preview import plan_lines
    from providers.catalog import default_catalog
    from scheduler.fleet import AgentHealth, AgentRecord, GatewayRecord
    from scheduler.messages import gateway_report_from_pb, registration_from_pb, report_from_pb
    from scheduler.snapshot import snapshot_from_fleet
    from spillway.status import fetch_fleet

    policy = load_policy(args.policy)
    if args.token_file is None:
        raise _BadInput("--token-file (or SPILLWAY_TOKEN_FILE) is required: an operator token")
    token = read_token(args.token_file)
    try:
        fleet = asyncio.run(fetch_fleet(args.scheduler, token, None))
    except grpc.aio.AioRpcError as exc:
        raise _Failure(f"scheduler {args.scheduler}: {exc.code().name}: {exc.details()}") from exc
    records = []
    for agent in fleet.agents:
        reg = registration_from_pb(agent.registration)
        record = AgentRecord(reg, registered_at=0.0, last_seen=0.0)
        if agent.HasField("last_report"):
            record.report = report_from_pb(agent.last_report, reg)
        health = (
            AgentHealth.CONNECTED
            if agent.health == pb.AGENT_HEALTH_CONNECTED
            else AgentHealth.STALE
        )
        records.append((record, health))
    gateways = [
        GatewayRecord(gateway_report_from_pb(g.last_report), received_at=0.0, last_seen=0.0)
        for g in fleet.gateways
    ]
    catalog = default_catalog()
    snapshot = snapshot_from_fleet(records, catalog, gateways=gateways)
    for line in plan_lines(policy, snapshot, catalog, time.time()):
        print(line)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from decisions.policycheck import load_policy
    from simulator import load_settings, load_trace, simulate
    from simulator.report import ranking_lines, table, verdict
    from simulator.run import tuning_window
    from simulator.scenarios import SimulationError

    policy = load_policy(args.policy)
    settings = load_settings(args.settings)
    overrides: dict[str, object] = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.ttft_slo is not None:
        overrides["ttft_slo_s"] = args.ttft_slo
    if args.reserved is not None:
        overrides["reserved"] = settings.reserved.model_copy(update={"machines": args.reserved})
    settings = settings.model_copy(update=overrides)
    trace = load_trace(args.trace).stretched(args.time_scale, args.loops)
    if args.hours is not None:
        trace = trace.stretched_to_hours(args.hours)
    tune_on, tune_label = None, ""
    if args.tune_on is not None:
        spec = args.tune_on
        if spec.startswith("hour:"):
            hour = spec.removeprefix("hour:")
            if not hour.isdigit():
                raise SimulationError(f"--tune-on {spec}: expected hour:N, N a whole number from 1")
            tune_on = tuning_window(trace, int(hour))
            tune_label = f"hour {int(hour)} of the scored trace (part of the scored data)"
        else:
            tune_on = load_trace(spec).stretched(args.time_scale)
            tune_label = f"the trace {spec}"
    sim = simulate(
        policy, trace, settings, deployment=args.deployment, tune_on=tune_on, tune_label=tune_label
    )
    files = sim.write(args.out, requests=not args.no_requests, png=not args.no_png)
    if args.json:
        data = sim.data()
        keep = (
            "trace",
            "deployment",
            "reserved",
            "notes",
            "tuning",
            "searches",
            "scenarios",
            "comparison",
        )
        print(json.dumps({k: data[k] for k in keep}, indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 150)
    for note in sim.setup.notes:
        console.print(f"note: {note}")
    console.print(table(sim.summaries, sim.title()))
    console.print(verdict(sim.comparison))
    for line in ranking_lines(sim.comparison):
        console.print(line)
    console.print(f"simulated in {sim.wall_s:.1f}s; wrote {', '.join(str(f) for f in files)}")
    return 0


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return number


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``minimum`` or more."""

    def whole_number(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(
                f"expected a whole number of {minimum} or more, got {value}"
            )
        return number

    return whole_number


def _cmd_policy_schema(args: argparse.Namespace) -> int:
    from decisions.policycheck import policy_schema

    print(json.dumps(policy_schema(), indent=2))
    return 0


class _BadInput(Exception):
    pass


class _Failure(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillway", description="Hybrid inference control plane.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SPILLWAY_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="the node agent").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    run = agent.add_parser("run", help="register with the scheduler and report capacity")
    run.add_argument("--config", type=Path, required=True, help="agent config file (YAML)")
    run.set_defaults(func=_cmd_agent_run)

    sched = commands.add_parser("scheduler", help="the control plane").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    run = sched.add_parser("run", help="serve agents and operators")
    run.add_argument("--config", type=Path, required=True, help="scheduler config file (YAML)")
    run.set_defaults(func=_cmd_scheduler_run)

    gw = commands.add_parser("gateway", help="the data plane").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    run = gw.add_parser("run", help="serve the OpenAI-compatible endpoint of every deployment")
    run.add_argument("--config", type=Path, required=True, help="gateway config file (YAML)")
    run.set_defaults(func=_cmd_gateway_run)

    status = commands.add_parser("status", help="show the fleet as a running scheduler sees it")
    status.add_argument(
        "--scheduler",
        action="append",
        metavar="HOST:PORT",
        help="a scheduler; give it once per scheduler to try them in order (default: "
        "--config's list, else $SPILLWAY_SCHEDULER, commas between several, else "
        "127.0.0.1:50051)",
    )
    status.add_argument(
        "--config",
        type=Path,
        help="an agent's or gateway's config: its scheduler address(es) and tls are used",
    )
    env_token = os.environ.get("SPILLWAY_TOKEN_FILE")
    status.add_argument(
        "--token-file",
        type=Path,
        default=Path(env_token) if env_token else None,
        help="operator token file (default: $SPILLWAY_TOKEN_FILE)",
    )
    status.add_argument("--ca-file", type=Path, help="CA that signed the scheduler's certificate")
    status.add_argument("--cert-file", type=Path, help="client certificate, for mutual TLS")
    status.add_argument("--key-file", type=Path, help="client key, for mutual TLS")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    status.add_argument("--json", action="store_true", help="print the fleet as JSON")
    status.set_defaults(func=_cmd_status)

    token = commands.add_parser("token", help="manage bearer tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    new = token.add_parser(
        "new",
        help="create a token, store its hash in the tokens file (replacing an earlier token "
        "of the same id and role) and print it once",
    )
    new.add_argument(
        "--id", required=True, help="agent id (role agent), operator name or gateway id"
    )
    new.add_argument("--role", choices=["agent", "operator", "gateway"], default="agent")
    new.add_argument("--tokens-file", type=Path, required=True, help="the scheduler's tokens file")
    new.add_argument("--out", type=Path, help="write the token to this file (mode 0600)")
    new.set_defaults(func=_cmd_token_new)

    demo = commands.add_parser(
        "demo", help="a burst spills out to rented GPUs inside the residency lock, and back"
    )
    demo.add_argument(
        "--seconds", type=float, default=240.0, help="give up after this long (default 240)"
    )
    demo.set_defaults(func=_cmd_demo)

    offers = commands.add_parser(
        "offers",
        help="rank every way the clouds sell GPUS x SKU, cheapest first (catalog list prices)",
    )
    offers.add_argument(
        "sku", metavar="SKU[:GPUS]", help="fungible SKU and count, e.g. H100-80GB:8"
    )
    offers.add_argument(
        "--residency", action="append", default=[], help="residency group(s): eu, us, uk, ..."
    )
    offers.add_argument("--cloud", action="append", default=[], help="aws, gcp or azure")
    offers.add_argument("--region", action="append", default=[], help="only these regions")
    offers.add_argument("--max-price", type=float, metavar="USD", help="per machine-hour")
    offers.add_argument("--limit", type=int, help="show the N cheapest")
    offers.add_argument("--json", action="store_true", help="print the offers as JSON")
    offers.set_defaults(func=_cmd_offers)

    fetch = commands.add_parser(
        "prefetch",
        help="download model weights from s3://, gs://, az:// or http(s):// in parallel ranges, "
        "verified and resumable",
        description="DEST follows cp and aws s3 cp: when SRC names one object, an existing "
        "directory or a DEST ending in '/' receives the file, and any other DEST is the file "
        "itself; for a prefix or a file list DEST is a directory. Exit codes: 0 done, "
        "1 transfer failed, 2 bad input (also a file where a directory must be), 3 not found, "
        "4 access denied, 5 verification failed, 6 disk full, 7 origin changed (the object "
        "changed during the download and kept changing when fetched again; no file is ever "
        "finished from two versions).",
    )
    fetch.add_argument("source", metavar="SRC", help="s3://, gs://, az:// or http(s):// URI")
    # A str, not a Path: a trailing '/' (DEST is a directory) must survive.
    fetch.add_argument(
        "dest",
        metavar="DEST",
        help="a directory, or for a single object the file itself (unless it is an existing "
        "directory or ends in '/')",
    )
    fetch.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="NAME",
        help="with an http(s) URL ending in '/': a file to fetch, 'NAME [SHA256]' (repeatable)",
    )
    fetch.add_argument("--files-from", type=Path, metavar="FILE", help="one 'NAME [SHA256]' a line")
    fetch.add_argument("--endpoint-url", help="S3 endpoint, or GCS emulator URL")
    fetch.add_argument(
        "--connections", type=_whole_number(1), help="parallel connections (default: auto)"
    )
    fetch.add_argument(
        "--max-connections", type=_whole_number(1), default=64, help="ceiling for auto"
    )
    fetch.add_argument("--range-size", metavar="SIZE", help="e.g. 16M (default: auto)")
    fetch.add_argument("--retries", type=int, default=6, help="retries per range (default 6)")
    fetch.add_argument("--no-fsync", action="store_true", help="skip fsync before the rename")
    fetch.add_argument(
        "--skip-sha256",
        action="store_true",
        help="do not compute sha256 for the manifest (size, the store's checksum and "
        "safetensors headers are still verified); saves about a core-second per GB",
    )
    fetch.add_argument("--json", action="store_true", help="print the result as JSON")
    fetch.set_defaults(func=_cmd_prefetch)

    policy = commands.add_parser("policy", help="the policy file").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    check = policy.add_parser("check", help="report every error of a policy file (exit 2)")
    check.add_argument("file", type=Path, metavar="FILE", help="policy file (YAML)")
    check.set_defaults(func=_cmd_policy_check)
    schema = policy.add_parser("schema", help="print the policy file's JSON Schema")
    schema.set_defaults(func=_cmd_policy_schema)

    plan = commands.add_parser("plan", help="what the policy would place where, and why")
    plan.add_argument("--policy", type=Path, required=True, help="policy file (YAML)")
    plan.add_argument(
        "--scheduler",
        default=os.environ.get("SPILLWAY_SCHEDULER", "127.0.0.1:50051"),
        help="host:port (default: $SPILLWAY_SCHEDULER or 127.0.0.1:50051)",
    )
    plan.add_argument(
        "--token-file",
        type=Path,
        default=Path(env_token) if env_token else None,
        help="operator token file (default: $SPILLWAY_TOKEN_FILE)",
    )
    plan.set_defaults(func=_cmd_plan)

    sim = commands.add_parser(
        "simulate",
        help="replay a request trace: what the policy costs and how it holds a TTFT target, "
        "against reserved-only, the peak reservation, rent-only, on-demand, managed-only and "
        "the hindsight bound",
    )
    sim.add_argument("--trace", type=Path, required=True, help="CSV: time, input and output tokens")
    sim.add_argument("--policy", type=Path, required=True, help="policy file (YAML)")
    sim.add_argument("--deployment", help="the deployment the trace is for (default: the only one)")
    sim.add_argument("--settings", type=Path, help="simulation assumptions (YAML)")
    sim.add_argument(
        "--time-scale", type=_positive, default=1.0, help="multiply trace times (2: half the rate)"
    )
    sim.add_argument(
        "--loops", type=_whole_number(1), default=1, help="play the trace this many times in a row"
    )
    sim.add_argument(
        "--hours",
        type=_positive,
        help="loop the trace and cut it at exactly this many hours (after --time-scale/--loops)",
    )
    sim.add_argument(
        "--tune-on",
        metavar="TRACE|hour:N",
        help="tune the baselines' searches on another trace (CSV), or on hour N of the scored "
        "trace (default: on the scored trace itself, and the output says so)",
    )
    sim.add_argument("--seed", type=int, help="seed of every random draw (default: settings)")
    sim.add_argument("--ttft-slo", type=_positive, help="TTFT target in seconds")
    sim.add_argument(
        "--reserved",
        type=_whole_number(0),
        help="reserved machines (default: sized to the mean load)",
    )
    sim.add_argument(
        "--out", type=Path, default=Path("simulation"), help="folder for JSON, PNG and CSV"
    )
    sim.add_argument("--json", action="store_true", help="print JSON instead of the table")
    sim.add_argument("--no-requests", action="store_true", help="skip the per-request CSV")
    sim.add_argument("--no-png", action="store_true", help="skip the PNG")
    sim.set_defaults(func=_cmd_simulate)
    return parser


def _is_input_error(exc: Exception) -> bool:
    """Whether ``exc`` is a ``common.configfile.InputError``, without importing that module
    (and pydantic with it) for commands that never read a config file, such as ``prefetch``,
    whose start-up time is part of every cold start."""
    configfile = sys.modules.get("common.configfile")
    return configfile is not None and isinstance(exc, configfile.InputError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _Failure as exc:
        print(f"spillway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        if not isinstance(exc, _BadInput) and not _is_input_error(exc):
            raise
        print(f"spillway: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130

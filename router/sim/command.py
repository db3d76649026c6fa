"""`smm-router sim`: the simulator's command-line options and its server."""

from __future__ import annotations

import argparse
import asyncio
from decimal import Decimal

from router import v2
from router.sim.faults import Fault
from router.sim.provider import SimProvider


class BadSpec(argparse.ArgumentTypeError, ValueError):
    """A bad command-line value; argparse shows its message as it is."""


def parse_fault(spec: str) -> tuple[int | None, Fault]:
    """`101=refuse` (one service), `*=slow` or `slow` (every service); else raise ValueError."""
    target, _, word = (part.strip() for part in spec.strip().rpartition("="))
    if word.lower() not in set(Fault):
        faults = ", ".join(Fault)
        raise BadSpec(f"unknown fault {word!r} in {spec!r}: use one of {faults}")
    if target in ("", "*"):
        return None, Fault(word.lower())
    service = v2.parse_id(target)
    if service is None:
        raise BadSpec(f"bad service {target!r} in {spec!r}: use a service ID or *")
    return service, Fault(word.lower())


def _decimal_arg(text: str) -> Decimal:
    value = v2.parse_decimal(text)
    if value is None or value < 0:
        raise BadSpec(f"not an amount: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `smm-router sim`."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=9101, help="port to listen on (0: any free port)")
    add("--key", default="sim-key", help="the API key the simulator accepts")
    add("--balance", type=_decimal_arg, default=Decimal("1000"), help="the starting balance")
    add("--currency", default="USD", help="the currency of the balance and the rates")
    add("--progress-seconds", type=float, default=10.0, help="how long an order takes")
    add("--partial-every", type=int, default=5, help="every Nth order ends Partial (0: none)")
    add("--slow-seconds", type=float, default=30.0, help="the delay of the slow fault")
    faults = ", ".join(fault.value for fault in Fault)
    add(
        "--fault",
        dest="faults",
        type=parse_fault,
        action="append",
        default=[],
        metavar="SPEC",
        help=f"SERVICE=FAULT or FAULT for every service (repeatable): {faults}",
    )
    add("--seed", type=int, default=0, help="the seed of the flaky fault")


async def serve_from_args(args: argparse.Namespace) -> None:
    """Run one simulated provider until cancelled."""
    sim = SimProvider(
        key=args.key,
        balance=args.balance,
        currency=args.currency,
        progress_seconds=args.progress_seconds,
        partial_every=args.partial_every,
        slow_seconds=args.slow_seconds,
        seed=args.seed,
    )
    for service, fault in args.faults:
        sim.set_fault(service, fault)
    port = await sim.start(args.host, args.port)
    try:
        print(
            f"sim provider listening on http://{args.host}:{port}/api/v2 (key: {args.key})",
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        await sim.stop()

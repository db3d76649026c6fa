"""What every command group of the CLI shares: operator input, tables, the config and the store.

Nothing heavy at import time: `smm-router --help` imports every command group, so a module a
command needs (the config's YAML loader, the store, aiohttp) is imported inside that command.
"""

from __future__ import annotations

import argparse
import getpass
import re
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from router import v2

if TYPE_CHECKING:
    from router.config import Config
    from router.store import Store

T = TypeVar("T")
Handler = Callable[[argparse.Namespace], int]

KEY_BYTES = 24
MAX_AMOUNT_DIGITS: Final = 12  # whole digits of an amount: below a trillion, far from overflow
_AMOUNT: Final = re.compile(r"-?(?P<whole>[0-9]+)(?:\.(?P<decimals>[0-9]+))?")
_SHOWN_CHARS: Final = 40  # of a refused amount or integer, in its one-line error
MAX_STORED_INT: Final = 2**63 - 1  # an SQLite INTEGER: what an upstream order ID may be
# What argparse would take for an unknown option although it is a value, bad or not: `-5` and
# `-.5` it reads as values already, not `-1e3`, `-Infinity` nor `-NaN` (nor `-٣`). As values,
# the command refuses them with its own error; an option is `--word` or `-h` here.
_NEGATIVE_VALUE: Final = re.compile(r"-(?:[^-A-Za-z]|(?i:s?nan|inf))")


class CommandError(Exception):
    """A command that cannot do what was asked: printed without a traceback, exit 1."""


def new_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def parse_amount(text: str) -> int:
    """A money amount typed by the operator ("25", "10.50", "-3") in minor units.

    Only a plain decimal: digits, an optional leading minus and at most MONEY_PLACES decimals,
    below 10**MAX_AMOUNT_DIGITS. No exponent ("1e3"), NaN, Infinity, hex, nor "-0"; raise
    CommandError (one line) for anything else.
    """
    plain = text.strip()
    shown = repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")
    match = _AMOUNT.fullmatch(plain)
    if match is None:
        raise CommandError(f"not a plain decimal amount: {shown} (write it as 25 or -10.50)")
    whole, decimals = match.group("whole", "decimals")
    if len(decimals or "") > v2.MONEY_PLACES:
        raise CommandError(f"amount {shown} has more than {v2.MONEY_PLACES} decimals")
    if len(whole) > MAX_AMOUNT_DIGITS:
        raise CommandError(
            f"amount {shown} is too large: at most {MAX_AMOUNT_DIGITS} digits before the point"
        )
    amount = Decimal(plain)
    if amount == 0 and plain.startswith("-"):
        raise CommandError(f"not a plain decimal amount: {shown} (write 0, not -0)")
    return v2.to_minor(amount)


def plain_int(
    maximum: int, *, minimum: int = 0, refusal: str | None = None
) -> Callable[[str], int]:
    """An argparse `type` for an integer typed by the operator (an ID, a quantity, a port).

    ASCII digits only, as the API reads its IDs: no sign, space, `_` or digits of another
    script (`int()` takes `+5`, ` 7 `, `1_000` and `٣`), at most as many as `maximum` has;
    from `minimum` to `maximum`. Else argparse's error: `refusal` (by default the rule) and
    the text as typed. Not v2.parse_plain_int itself: it strips spaces, and its 16 digits are
    fewer than an upstream order ID may have.
    """
    digits = len(str(maximum))
    refusal = refusal or f"not a plain decimal integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        plain = 0 < len(text) <= digits and text.isascii() and text.isdigit()
        number = int(text) if plain else None
        if number is None or not minimum <= number <= maximum:
            raise argparse.ArgumentTypeError(f"{refusal}: {_shown(text)}")
        return number

    return parse


def positive_number(below: float, refusal: str) -> Callable[[str], float]:
    """An argparse `type` for a count that need not be whole (days, seconds): more than 0 and
    less than `below`; else argparse's error, `refusal` and the text as typed."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = -1.0
        if not 0 < number < below:  # NaN too: it compares false
            raise argparse.ArgumentTypeError(f"{refusal}: {text!r}")
        return number

    return parse


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(row[c])) for row in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def config_path(args: argparse.Namespace) -> Path:
    """The config file a command reads: --config, else $SMM_ROUTER_CONFIG, else the default."""
    from router import config as config_module

    config: str | None = getattr(args, "config", None)  # `sim` has no config
    return Path(config) if config else config_module.default_config_path()


def load_config(args: argparse.Namespace) -> Config:
    from router import config as config_module

    path = config_path(args)
    try:
        return config_module.load(path)
    except config_module.ConfigUnreadable:
        raise  # main() says how the file was chosen
    except config_module.ConfigError as exc:
        raise CommandError(f"{path}: invalid config\n{exc}") from exc


def run(work: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(work)`, with asyncio imported only by the commands that run something."""
    import asyncio

    return asyncio.run(work)


async def with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    from router.store import Store

    store = await Store.open(config.database)
    try:
        return await work(store)
    finally:
        await store.close()


def remedy(fix: str | None, setting: str, args: argparse.Namespace) -> str:
    """What to do about a failure: `fix` it, or change the setting that led to it."""
    if setting.startswith("--"):
        change = f"pass another {setting}"
    else:
        change = f"set {setting} in {config_path(args)}"
    return f"{fix} or {change}" if fix else change


def age(seconds: float) -> str:
    """An age a person reads at a glance: 3d4h, 2h5m, 7m12s, 40s."""
    total = max(int(seconds), 0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if total >= size:
            return f"{total // size}{unit}{total % size // sub_size}{sub}"
    return f"{total // 60}m{total % 60}s" if total >= 60 else f"{total}s"


def cell(value: object) -> str:
    """A table cell on one line (upstream error texts can be whole HTML pages)."""
    return "-" if value is None else " ".join(str(value).split())


def operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment or the password database
        return "operator"


class CommandParser(argparse.ArgumentParser):
    """A parser that can add its arguments only once its command is chosen (`populate`): those
    of `sim` live with the simulator, which imports aiohttp, and `probe`'s default comes from
    the config; `smm-router --help` and the other commands need neither."""

    def __init__(
        self,
        *args: Any,
        populate: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate
        # argparse's own attribute (typeshed declares it): which tokens are values, not options.
        self._negative_number_matcher = _NEGATIVE_VALUE

    def parse_known_args(  # type: ignore[override]  # one signature for typeshed's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return super().parse_known_args(args, namespace)


class Commands:
    """One level of subcommands: each gets the shared --config/--json options and a handler."""

    def __init__(self, group: Any, common: argparse.ArgumentParser) -> None:
        self._group = group  # argparse's _SubParsersAction, which it does not export
        self._common = common

    def add(self, name: str, handler: Handler, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = self._group.add_parser(
            name, parents=[self._common], help=text, description=text, **kwargs
        )
        sub.set_defaults(handler=handler)
        return sub

    def add_bare(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A command without the shared options (it sets its own, and its handler); pass
        `populate` to add them only once the command is chosen (CommandParser)."""
        parser: argparse.ArgumentParser = self._group.add_parser(name, **kwargs)
        return parser

    def group(self, name: str, text: str, dest: str) -> Commands:
        """A command with actions of its own (`clients add`, `clients list`, ...)."""
        actions = self._group.add_parser(name, help=text).add_subparsers(
            dest=dest, required=True, metavar="ACTION"
        )
        return Commands(actions, self._common)

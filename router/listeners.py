"""Listening sockets: an address that cannot be had is a ListenError naming the setting that
chose it, so the command line can say what to change instead of printing a traceback.

Usage::

    sockets = bind(host, port, port_setting="listen.port", host_setting="listen.host")
    ...                                            # open the database, set up the runner
    await start_sites(runner, sockets)
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from typing import Final

from aiohttp import web

BACKLOG: Final = 128  # aiohttp's default
# Failures of a bind that the port is to blame for (another port fixes them); any other (an
# address that is not this machine's, a name that does not resolve) is the host's.
_PORT_ERRORS: Final = frozenset({errno.EADDRINUSE, errno.EACCES})
_FIXES: Final = {
    errno.EADDRINUSE: "stop what uses it",
    errno.EACCES: "run it with the right to bind ports below 1024",
}


class ListenError(Exception):
    """A listener could not be opened: on which address, the setting to change, and why.

    `setting` is a config key (`listen.port`) or a command-line flag (`--port`); `source`, shown
    in parentheses, says how that setting chose the address (`--port 8000 + 1`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        cause: OSError,
        *,
        port_setting: str,
        host_setting: str,
        port_source: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        self.port_setting = port_setting
        self.host_setting = host_setting
        self.port_source = port_source or port_setting
        on_port = cause.errno in _PORT_ERRORS
        self.setting = port_setting if on_port else host_setting
        self.source = self.port_source if on_port else host_setting
        # A bind error reads "[Errno 98] error while attempting to bind on address ...": the
        # errno's own words say it better; a resolver error (gaierror) has only its text.
        if cause.errno is not None and cause.errno > 0:
            self.reason = os.strerror(cause.errno).lower()
        else:
            self.reason = (cause.strerror or str(cause)).lower()
        self.fix = _FIXES.get(cause.errno or 0)
        super().__init__(f"cannot listen on {host}:{port} ({self.source}): {self.reason}")

    def port_chosen_by(self, setting: str, source: str) -> ListenError:
        """The same failure, for a port that `setting` chose (the demo's `--port`)."""
        return ListenError(
            self.host,
            self.port,
            self.cause,
            port_setting=setting,
            host_setting=self.host_setting,
            port_source=source,
        )


def bind(host: str, port: int, *, port_setting: str, host_setting: str) -> list[socket.socket]:
    """Listening sockets on host:port (one per address the host resolves to), as asyncio's
    create_server would open them; ListenError if the system refuses one.

    Bound before anything else starts, a port that is taken changes nothing: the caller has not
    opened its database or started a loop yet.
    """
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses it
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)  # held from now on, not only reserved
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(
            host, port, exc, port_setting=port_setting, host_setting=host_setting
        ) from exc
    return sockets


async def start_sites(runner: web.BaseRunner, sockets: Iterable[socket.socket]) -> None:
    """Serve `runner` (set up) on sockets from `bind`."""
    for sock in sockets:
        await web.SockSite(runner, sock, backlog=BACKLOG).start()

"""Load generators for the benchmarks: requests over keep-alive connections, timed one by one.

    load = await measure(url, [body], connections=64, seconds=6, check=b'"order"')
    load.rate, load.p50, load.p99          # answers per second; seconds, from per-request timings

Two generators, one contract (`measure`), chosen by `generator`:
- `wrk` (Debian's package `wrk`, used only when it is on PATH: nothing installs it): C, one
  thread, so it takes the least of the cores that the servers it measures share with it. Its
  percentiles come from its histogram of every request's latency (microsecond resolution).
- `python`: raw asyncio streams with the requests encoded once, no HTTP client library. It
  costs a few tens of microseconds of CPU per request, which the servers lose; it keeps every
  request's latency and reads every answer.
`auto` is wrk when present, else python. Both are closed loops (each connection sends its next
request when the previous answer is in), both check every answer (status 200 and a byte string
in the body), and both stop sending at the deadline; python also waits for the answers in
flight, so its count of answers is exact.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

GENERATORS: Final = ("auto", "wrk", "python")
WRK_TIMEOUT: Final = "10s"  # far above any latency measured here: a timeout is a failure
WARM_UP_SECONDS: Final = 1.0
FORM: Final = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class Load:
    """What one measurement saw."""

    generator: str
    connections: int
    seconds: float  # from the first request sent to the last answer read
    answers: int  # answers read (good or not)
    failed: int  # answers that were not 200 with the expected text, and socket errors
    p50: float  # seconds
    p90: float
    p99: float

    @property
    def rate(self) -> float:
        """Good answers per second."""
        return (self.answers - self.failed) / self.seconds if self.seconds else 0.0


def resolve(generator: str) -> str:
    """The generator `auto` stands for on this machine, or the one named (checked)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown load generator {generator!r}: use one of {GENERATORS}")
    if generator == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if generator == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk); use python")
    return generator


def describe(generator: str) -> str:
    """One line naming the generator that produces the figures, for the benches' output."""
    if generator == "wrk":
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        version = " ".join((done.stdout or done.stderr).split()[:2])
        return f"wrk ({version}, one thread)"
    note = "" if shutil.which("wrk") else "; wrk is not on PATH (Debian: apt-get install wrk)"
    return (
        "python (asyncio streams in the bench's process: it takes more CPU from the servers "
        f"than wrk, which flatters the router's ratios{note})"
    )


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest rank: the smallest value with at least `share` of all values at or below it."""
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


async def measure(
    url: str,
    bodies: Sequence[str] | None,
    *,
    connections: int,
    seconds: float,
    check: bytes = b"",
    generator: str = "auto",
    warm_up: float = WARM_UP_SECONDS,
) -> Load:
    """POST each of `bodies` in turn (a form), or GET `url` when `bodies` is None, from
    `connections` connections for `seconds`, after `warm_up` seconds that are not counted."""
    chosen = resolve(generator)
    run = _wrk if chosen == "wrk" else _python
    if warm_up > 0:
        await run(url, bodies, connections, warm_up, check)
    return await run(url, bodies, connections, seconds, check)


async def timed_gets(url: str, times: int) -> list[float]:
    """`times` GETs of `url`, one after another on one keep-alive connection: each one's
    seconds, from its request written to its answer read. Any answer but 200 is an error."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    request = _encode(url, None)
    took = []
    try:
        for _ in range(times):
            sent = time.perf_counter()
            writer.write(request)
            status, body = await _read_answer(reader)
            took.append(time.perf_counter() - sent)
            if status != 200:
                raise RuntimeError(f"GET {url}: HTTP {status}: {body[:200]!r}")
    finally:
        writer.close()
    return took


# --- python --------------------------------------------------------------------------------------


def _encode(url: str, body: str | None) -> bytes:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head = f"{'GET' if body is None else 'POST'} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    if body is None:
        return f"{head}\r\n".encode()
    data = body.encode()
    head += f"Content-Type: {FORM}\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 answer: Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lowered.index(b"\r\n", at + 2)
        return status, await reader.readexactly(int(lowered[at + 17 : end]))
    if b"\r\ntransfer-encoding: chunked" not in lowered:
        raise ValueError("an answer without Content-Length that is not chunked")
    chunks = []
    while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")  # no trailers are sent here: the empty line
    return status, b"".join(chunks)


async def _python(
    url: str, bodies: Sequence[str] | None, connections: int, seconds: float, check: bytes
) -> Load:
    requests = [_encode(url, None)] if bodies is None else [_encode(url, b) for b in bodies]
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    failed = 0
    clock = time.perf_counter

    async def connection(offset: int) -> None:
        nonlocal failed
        reader, writer = await asyncio.open_connection(host, port)
        try:
            index = offset
            while (sent := clock()) < deadline:
                writer.write(requests[index % len(requests)])
                index += 1
                try:
                    status, body = await _read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    failed += 1
                    latencies.append(clock() - sent)
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(clock() - sent)
                if status != 200 or check not in body:
                    failed += 1
        finally:
            writer.close()

    started = clock()
    deadline = started + seconds
    await asyncio.gather(*(connection(n) for n in range(connections)))
    elapsed = clock() - started
    latencies.sort()
    return Load(
        "python",
        connections,
        elapsed,
        len(latencies),
        failed,
        percentile(latencies, 0.50),
        percentile(latencies, 0.90),
        percentile(latencies, 0.99),
    )


# --- wrk -----------------------------------------------------------------------------------------

# `bodies` and `check` arrive as Lua string literals; done() prints one JSON line.
_WRK_SCRIPT: Final = """
local bodies = {bodies}
local check = {check}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args)
  bad = 0
  requests = {{}}
  for i, body in ipairs(bodies) do
    if body == "" then
      requests[i] = wrk.format("GET", nil, {{}}, nil)
    else
      requests[i] = wrk.format("POST", nil, {{["Content-Type"] = "{form}"}}, body)
    end
  end
  n = 0
end
function request()
  n = n % #requests + 1
  return requests[n]
end
function response(status, headers, body)
  if status ~= 200 or not string.find(body, check, 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + thread:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'WRK {{"answers": %d, "us": %d, "bad": %d, "errors": %d, ' ..
    '"p50": %d, "p90": %d, "p99": %d}}\\n',
    summary.requests, summary.duration, failed, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def _lua(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return '"' + "".join(f"\\{byte:03d}" for byte in raw) + '"'


async def _wrk(
    url: str, bodies: Sequence[str] | None, connections: int, seconds: float, check: bytes
) -> Load:
    texts = [""] if bodies is None else list(bodies)
    assert all(texts) or bodies is None, "an empty body is how the script says GET"
    script = _WRK_SCRIPT.format(
        bodies="{" + ",".join(_lua(t) for t in texts) + "}", check=_lua(check), form=FORM
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "load.lua"
        path.write_text(script)
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(seconds, 1):.0f}s"]
        argv += ["--timeout", WRK_TIMEOUT, "-s", str(path), url]
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRK ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    summary = json.loads(lines[-1][4:])
    return Load(
        "wrk",
        connections,
        summary["us"] / 1e6,
        summary["answers"] + summary["errors"],
        summary["bad"] + summary["errors"],
        summary["p50"] / 1e6,
        summary["p90"] / 1e6,
        summary["p99"] / 1e6,
    )

"""The flood of scripts/bench flood: idle and slowloris sockets against one node, while
probes check that it still serves /healthz and new WebSocket clients.

flood.py PUBLIC ADMIN PID SILENT SLOWLORIS ADMIN_SILENT WATCH_S
  PUBLIC, ADMIN  host:port of the node's ports (embedded default: ?user= needs no token)
  PID            the node's process id (its open files are sampled from /proc)
  SILENT         sockets on PUBLIC that send nothing
  SLOWLORIS      sockets on PUBLIC that start a request head and add one byte a second
  ADMIN_SILENT   sockets on ADMIN that send nothing
  WATCH_S        how long, once the flood is open, to keep probing and watching
Prints one JSON object: what the server closed and when, what stayed open, and how the
probes fared (counts, p50/p99/max in ms), the node's most open files.
"""

import asyncio
import base64
import json
import os
import resource
import sys
import time


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * p))], 1)


async def open_conn(addr):
    host, port = addr.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def watch_close(reader, opened, closes):
    """Records when the server closed this socket (EOF or reset), seconds after it opened."""
    try:
        while True:
            data = await reader.read(4096)
            if not data:
                break
    except (ConnectionError, OSError):
        pass
    closes.append(time.monotonic() - opened)


async def slowloris(writer):
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        while True:
            await asyncio.sleep(1)
            writer.write(b"a")
            await writer.drain()
    except (ConnectionError, OSError):
        pass


async def probe_healthz(admin, until, results):
    while time.monotonic() < until:
        started = time.monotonic()
        ok = False
        try:
            reader, writer = await asyncio.wait_for(open_conn(admin), 2)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await asyncio.wait_for(reader.read(64), 2)
            ok = head.startswith(b"HTTP/1.1 200")
            writer.close()
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        results.append((ok, (time.monotonic() - started) * 1000))
        await asyncio.sleep(0.25)


async def probe_ws(public, until, results):
    n = 0
    while time.monotonic() < until:
        n += 1
        started = time.monotonic()
        ok = False
        try:
            reader, writer = await asyncio.wait_for(open_conn(public), 2)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET /ws?user=probe{n} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            if head.startswith(b"HTTP/1.1 101"):
                first = await asyncio.wait_for(reader.readexactly(2), 2)
                length = first[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                payload = await asyncio.wait_for(reader.readexactly(length), 2)
                ok = b'"t":"hello"' in payload
            writer.close()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        results.append((ok, (time.monotonic() - started) * 1000))
        await asyncio.sleep(0.5)


async def sample_files(pid, until, most):
    while time.monotonic() < until:
        try:
            most[0] = max(most[0], len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass
        await asyncio.sleep(0.5)


def summary(results):
    oks = [ms for ok, ms in results if ok]
    return {
        "ok": len(oks),
        "total": len(results),
        "p50_ms": pct(oks, 0.5),
        "p99_ms": pct(oks, 0.99),
        "max_ms": round(max(oks), 1) if oks else None,
    }


async def main():
    public, admin, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    silent, lorises, admin_silent, watch_s = map(int, sys.argv[4:8])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    closes = {"silent": [], "slowloris": [], "admin": []}
    writers, tasks = [], []
    most_files = [0]
    start = time.monotonic()
    tasks.append(asyncio.create_task(sample_files(pid, start + 3600, most_files)))
    refused = 0
    opened = {"silent": 0, "slowloris": 0, "admin": 0}
    for kind, addr, n in (("silent", public, silent), ("slowloris", public, lorises),
                          ("admin", admin, admin_silent)):
        failed_in_a_row = 0
        for i in range(n):
            if failed_in_a_row == 10:
                # The node takes no more (its accept queue is full): count the rest.
                refused += n - i
                break
            try:
                reader, writer = await asyncio.wait_for(open_conn(addr), 1)
                failed_in_a_row = 0
            except (asyncio.TimeoutError, OSError):
                refused += 1
                failed_in_a_row += 1
                continue
            writers.append(writer)
            opened[kind] += 1
            tasks.append(asyncio.create_task(watch_close(reader, time.monotonic(), closes[kind])))
            if kind == "slowloris":
                tasks.append(asyncio.create_task(slowloris(writer)))
    opened_s = time.monotonic() - start
    until = time.monotonic() + watch_s
    tasks.append(asyncio.create_task(sample_files(pid, until, most_files)))
    healthz, ws = [], []
    await asyncio.gather(probe_healthz(admin, until, healthz), probe_ws(public, until, ws))
    await asyncio.sleep(max(0.0, until - time.monotonic()))

    # connect_failed: connections the node did not take within 1 s (after 10 in a row, the
    # rest of that kind is not tried and counted here too).
    out = {"flood_open_s": round(opened_s, 2), "connect_failed": refused}
    for kind in ("silent", "slowloris", "admin"):
        c = closes[kind]
        out[kind] = {
            "opened": opened[kind],
            "closed_by_server": len(c),
            "still_open": opened[kind] - len(c),
            "close_p50_s": pct(c, 0.5),
            "close_max_s": round(max(c), 2) if c else None,
        }
    out["healthz"] = summary(healthz)
    out["new_ws"] = summary(ws)
    out["node_most_open_files"] = most_files[0]
    print(json.dumps(out))
    for w in writers:
        w.close()
    for t in tasks:
        t.cancel()


asyncio.run(main())

"""The impairment relay: latency, jitter and loss in userspace, for a kernel without netem.

Run inside the WAN router's namespace (``python -m hil.relay --iif wan0 --iif c-aws ...``). It
opens a TUN device, points a routing table at it and adds a policy rule per named ingress
interface, so every IP packet the router would forward from those interfaces is handed to this
process instead. Each packet is dropped with probability ``loss``, else held for ``delay`` plus
uniform jitter and written back into the TUN device, where the kernel routes it on as if it had
just arrived (the rules match only the real interfaces, so a packet passes the relay once).
Release times never go backwards: packets leave in the order they came, as on a real link
(TCP sees latency and loss, not reordering). Packets are IP datagrams, so the loss is real loss
that TCP must retransmit, not a delay of a byte stream.

On SIGTERM it removes its rules, prints one JSON line of counters and exits; the TUN device
(and its route) vanish with the process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import fcntl
import os
import random
import signal
import struct
import subprocess
import sys
import time

import orjson

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
TABLE = "100"


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


class Relay:
    def __init__(self, *, fd: int, delay_s: float, jitter_s: float, loss: float,
                 seed: int | None = None) -> None:
        self.fd, self.delay_s, self.jitter_s, self.loss = fd, delay_s, jitter_s, loss
        self._rng = random.Random(seed)
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._last = 0.0
        self.counts = {"packets": 0, "dropped": 0, "bytes": 0}

    def readable(self) -> None:
        while True:
            try:
                pkt = os.read(self.fd, 65535)
            except BlockingIOError:
                return
            self.counts["packets"] += 1
            if self._rng.random() < self.loss:
                self.counts["dropped"] += 1
                continue
            jitter = self._rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
            release = max(self._last, time.monotonic() + max(0.0, self.delay_s + jitter))
            self._last = release
            self._queue.append((release, pkt))
            self.counts["bytes"] += len(pkt)
            self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            release, pkt = self._queue[0]
            wait = release - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the impairment itself: the packet's delay
                continue
            self._queue.popleft()
            try:
                os.write(self.fd, pkt)
            except BlockingIOError:
                self.counts["dropped"] += 1  # the TUN queue is full: a real tail drop


async def _main(args: argparse.Namespace) -> None:
    fd = open_tun(args.dev)
    _ip("link", "set", "dev", args.dev, "up", "mtu", "1500")
    _ip("route", "replace", "default", "dev", args.dev, "table", TABLE)
    for iif in args.iif:
        _ip("rule", "add", "iif", iif, "lookup", TABLE, "priority", "100")
    relay = Relay(fd=fd, delay_s=args.delay_ms / 1000, jitter_s=args.jitter_ms / 1000,
                  loss=args.loss, seed=args.seed)
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, relay.readable)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(relay.run(), name="relay")
    print(orjson.dumps({"event": "relay.ready", "dev": args.dev, "iif": args.iif}).decode(),
          flush=True)
    await stop.wait()
    task.cancel()
    for iif in args.iif:
        _ip("rule", "del", "iif", iif, "lookup", TABLE, "priority", "100", check=False)
    print(orjson.dumps({"event": "relay.stopped", **relay.counts}).decode(), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hil.relay", description=__doc__.split("\n")[0])
    p.add_argument("--dev", default="imp0")
    p.add_argument("--iif", action="append", required=True, help="an ingress interface")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="drop probability, 0-1")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.loss < 1.0:
        p.error("--loss must be in [0, 1)")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

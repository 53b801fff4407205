"""`python -m bench._launch FACTORY PORT WORKERS LOOP HTTP`: uvicorn for bench/intake.py.

The listening socket comes from `bot.web.serving.bind_socket`, which names the protocol
(IPPROTO_TCP). uvicorn's own socket for --workers leaves it 0, and asyncio sets TCP_NODELAY only
on connections whose socket says TCP: every answer (headers, then body: two writes) then waited
up to 40 ms for the client's delayed ACK, for the bare endpoint as much as for the app. With one
worker this is also how `serve` runs.

With WORKERS > 1 this starts that many independent server processes, each on its own
SO_REUSEPORT socket on the same port, and waits for them. `uvicorn --workers N` shares one
listening socket instead, and whichever process wakes first accepts: on the 2-core VM one of two
processes took 30 to 32 of the load generator's 32 connections in six tries of six, so a
"2-process" figure measured one busy process and one idle one, and swung with the split. The
kernel spreads connections over SO_REUSEPORT sockets by their addresses, as a balancer spreads
them over replicas (the product scales out by replicas, not by processes inside one).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import FrameType

import uvicorn

from bot.web.serving import bind_socket


def serve_one(factory: str, port: int, loop: str, http: str, *, reuse_port: bool) -> None:
    config = uvicorn.Config(
        f"bench._servers:{factory}",
        factory=True,
        host="127.0.0.1",
        port=port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
    )
    sock = bind_socket("127.0.0.1", port, reuse_port=reuse_port)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str]) -> None:
    factory, port, workers, loop, http = argv[:5]
    if int(workers) == 1:
        serve_one(factory, int(port), loop, http, reuse_port=len(argv) > 5)
        return
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench._launch", factory, port, "1", loop, http, "reuse-port"]
        )
        for _ in range(int(workers))
    ]

    def stop(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)  # each runs its lifespan's shutdown

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])

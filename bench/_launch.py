"""`python -m bench._launch FACTORY PORT WORKERS LOOP HTTP`: uvicorn for bench/intake.py.

What `uvicorn --workers N` does, with one difference: the listening socket comes from
`bot.web.serving.bind_socket`, which names the protocol (IPPROTO_TCP). uvicorn's own socket for
--workers leaves it 0, and asyncio sets TCP_NODELAY only on connections whose socket says TCP:
every answer (headers, then body: two writes) then waited up to 40 ms for the client's delayed
ACK, for the bare endpoint as much as for the app. With one worker this is also how `serve` runs.
"""

from __future__ import annotations

import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from bot.web.serving import bind_socket


def main(argv: list[str]) -> None:
    factory, port, workers, loop, http = argv
    config = uvicorn.Config(
        f"bench._servers:{factory}",
        factory=True,
        host="127.0.0.1",
        port=int(port),
        workers=int(workers),
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        # The supervisor pings each worker and kills one that does not answer within this many
        # seconds; the answer comes from a thread that starts only once the worker has imported
        # the app. On a loaded 2-core machine that import takes longer than uvicorn's default 5 s,
        # so workers were killed and restarted in a loop, and the connections the load generator
        # had on them were never answered (the run then died on its own timeout).
        timeout_worker_healthcheck=120,
    )
    sock = bind_socket("127.0.0.1", int(port))
    if config.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])

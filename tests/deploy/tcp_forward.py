"""Forward TCP from an address on the test bridge to 127.0.0.1 (run as a script by the netns test).

Usage: tcp_forward.py LISTEN_HOST LISTEN_PORT:TARGET_PORT [...]. Redis and Postgres listen on
loopback only; the workers in their network namespaces reach them through this.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _handler(target: int):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return handle


async def main(host: str, routes: list[str]) -> None:
    servers = []
    for route in routes:
        listen, target = (int(p) for p in route.split(":"))
        servers.append(await asyncio.start_server(_handler(target), host, listen))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))

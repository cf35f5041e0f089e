"""The bare trio relay: the Python baseline of the proxy benchmarks.

    .venv/bin/python bench/bare_relay.py --listen CLIENT_SOCK --server SERVER_SOCK

For every client, connect to the server and run one task per direction that
receives a whole message with :class:`vfioproxy.io.transport.FdStream`
(``recvmsg`` of the header with an ancillary buffer, then the body), sends it
in one ``sendmsg`` with its fds and closes its copies of the fds. Nothing
else: no decoding, no counters, no session state, no recording. What
``vfioproxy proxy`` costs on top of this is what the proxy itself adds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import trio

from vfioproxy.errors import ConnectionClosedError, TransportError
from vfioproxy.io.transport import FdStream, open_unix_fd_stream
from vfioproxy.proxy.tuning import tune_allocator


async def pump(src: FdStream, dst: FdStream, done: trio.CancelScope) -> None:
    """Forward messages from ``src`` to ``dst`` until either side goes away."""
    try:
        while True:
            data, fds = await src.receive_message()
            try:
                await dst.send_message(data, fds)
            finally:
                for fd in fds:
                    fd.close()
    except (ConnectionClosedError, TransportError, trio.ClosedResourceError, OSError):
        pass
    finally:
        done.cancel()


async def relay(sock: trio.socket.SocketType, server_path: str) -> None:
    """One client session: both directions until one side closes."""
    client = FdStream(sock)
    try:
        server = await open_unix_fd_stream(server_path)
    except OSError as exc:
        print(f"bare_relay: cannot connect to {server_path}: {exc}", file=sys.stderr)
        await client.aclose()
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, nursery.cancel_scope)
            nursery.start_soon(pump, server, client, nursery.cancel_scope)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
            await server.aclose()


async def serve(listen_path: str, server_path: str) -> None:
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(listen_path):
        os.unlink(listen_path)
    await listener.bind(listen_path)
    listener.listen(16)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop)
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(relay, sock, server_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="CLIENT_SOCK")
    parser.add_argument("--server", required=True, metavar="SERVER_SOCK")
    args = parser.parse_args()
    tune_allocator()  # as the proxy does (vfioproxy/proxy/tuning.py)
    try:
        trio.run(serve, args.listen, args.server)
    finally:
        if os.path.exists(args.listen):
            os.unlink(args.listen)


if __name__ == "__main__":
    main()

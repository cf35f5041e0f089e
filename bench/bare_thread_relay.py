"""The bare threaded relay: the baseline of ``vfioproxy proxy``'s threaded forwarding.

    .venv/bin/python bench/bare_thread_relay.py --listen CLIENT_SOCK --server SERVER_SOCK

For every client, connect to the server and run one OS thread that polls
both sockets and, for each that is readable, receives a whole message with
:class:`vfioproxy.io.blocking_transport.BlockingFdSocket` (``recvmsg`` of the
header with an ancillary buffer, then ``recv`` of the body), sends it in one
``sendmsg`` with its fds and closes its copies of the fds.
Nothing else: no decoding, no counters, no session state, no recording, no
event loop. The proxy forwards the same way (``--forwarding threads``, its
default), so what ``vfioproxy proxy`` costs on top of this is what its
digest (decoding, checks, recording) and bookkeeping add;
``bare_relay.py`` is the same baseline for trio forwarding.

A side that leaves (EOF, reset, error) ends the session; SIGINT or SIGTERM ends the process and
removes CLIENT_SOCK.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
from types import FrameType

from vfioproxy.errors import TransportError
from vfioproxy.io.blocking_transport import BlockingFdSocket
from vfioproxy.proxy.tuning import tune_allocator


def relay(client: BlockingFdSocket, server: BlockingFdSocket) -> None:
    """Forward whichever side has a message until either side goes away."""
    routes = {client.fileno(): (client, server), server.fileno(): (server, client)}
    poller = select.poll()
    for fd in routes:
        poller.register(fd, select.POLLIN)
    try:
        while True:
            for fd, _ in poller.poll():
                src, dst = routes[fd]
                data, fds = src.receive_message()
                try:
                    dst.send_message(data, fds)
                finally:
                    for owned in fds:
                        owned.close()
    except (TransportError, OSError):  # EOF, reset, too many fds: the session is over
        pass


def session(sock: socket.socket, server_path: str) -> None:
    """One client session on one thread until one side closes."""
    client = BlockingFdSocket(sock)
    server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server_sock.connect(server_path)
    except OSError as exc:
        print(f"bare_thread_relay: cannot connect to {server_path}: {exc}", file=sys.stderr)
        server_sock.close()
        client.close()
        return
    server = BlockingFdSocket(server_sock)
    try:
        relay(client, server)
    finally:
        client.close()
        server.close()


def serve(listen_path: str, server_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(listen_path):
        os.unlink(listen_path)
    listener.bind(listen_path)
    listener.listen(16)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=session, args=(sock, server_path), daemon=True).start()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="CLIENT_SOCK")
    parser.add_argument("--server", required=True, metavar="SERVER_SOCK")
    args = parser.parse_args()
    tune_allocator()  # as the proxy does (vfioproxy/proxy/tuning.py)
    signal.signal(signal.SIGINT, _exit_on_signal)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        serve(args.listen, args.server)
    finally:  # the session threads are daemons: they end with the process
        if os.path.exists(args.listen):
            os.unlink(args.listen)


if __name__ == "__main__":
    main()

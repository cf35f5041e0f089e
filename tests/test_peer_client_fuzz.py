"""Fuzz: a misbehaving server never crashes, hangs or leaks the realize client.

The server replays the real captures with mutations (bit flips, truncation,
wrong ids and commands, random fds, silence, duplicates, error replies, and
commands of its own). The client must either complete or fail with
:class:`RealizeError`; time is a MockClock, so QEMU's 5 s timeouts are
instant, and every fd is counted before and after each example.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FD_HYGIENE
from tests.test_peer_client import E1K, GPIO, LVU, NVME, CaptureServer, serving
from vfioproxy.io.fds import OwnedFd, close_all, count_open_fds, make_eventfd, make_memfd
from vfioproxy.peers.client import RealizeError, RealizeOptions, open_realize_client, realize
from vfioproxy.peers.endpoint import ErrorReplyError, ReplyTimeoutError
from vfioproxy.protocol.bodies import DmaAccessBody, DmaLayout
from vfioproxy.protocol.codec import Message
from vfioproxy.protocol.header import HEADER_SIZE, Command, Header

pytestmark = FD_HYGIENE

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KINDS = (
    "bitflip",
    "truncate",
    "truncate-keep-size",
    "wrong-id",
    "wrong-command",
    "fds",
    "silence",
    "duplicate",
    "error",
    "server-command",
)


@attrs.frozen
class Mutation:
    """Applied to the answer to the client's ``at``-th command."""

    at: int
    kind: str
    a: int
    b: int


mutations = st.lists(
    st.builds(
        Mutation,
        at=st.integers(0, 50),
        kind=st.sampled_from(KINDS),
        a=st.integers(0, 1 << 20),
        b=st.integers(0, 255),
    ),
    max_size=4,
)


def random_fds(n: int) -> list[OwnedFd]:
    return [make_eventfd() if i % 2 else make_memfd("fuzz", 4096) for i in range(n)]


def mutate(
    m: Mutation, sends: list[tuple[bytes, list[OwnedFd]]]
) -> list[tuple[bytes, list[OwnedFd]]]:
    if not sends:
        return sends
    data, fds = sends[0]
    rest = sends[1:]
    if len(data) < HEADER_SIZE:  # already cut inside its header: leave it so
        return sends
    header = Header.parse(data)
    if m.kind == "bitflip":
        bit = m.a % (len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return [(bytes(flipped), fds), *rest]
    if m.kind == "truncate":
        cut = data[: HEADER_SIZE + m.a % (len(data) - HEADER_SIZE + 1)]
        return [
            (struct.pack("<HHI", header.msg_id, header.command, len(cut)) + cut[8:], fds),
            *rest,
        ]
    if m.kind == "truncate-keep-size":
        return [(data[: max(1, m.a % len(data))], fds), *rest]
    if m.kind == "wrong-id":
        return [(struct.pack("<H", (header.msg_id + 1 + m.a) & 0xFFFF) + data[2:], fds), *rest]
    if m.kind == "wrong-command":
        return [(data[:2] + struct.pack("<H", m.b % 20) + data[4:], fds), *rest]
    if m.kind == "fds":
        return [(data, fds + random_fds(m.b % 20 + 1)), *rest]
    if m.kind == "silence":
        for _, extra in sends:
            close_all(extra)
        return []
    if m.kind == "duplicate":
        return [(data, fds), (data, []), *rest]
    if m.kind == "error":
        payload = data[HEADER_SIZE:] if m.b % 2 else b""
        error = Header(header.msg_id, header.command, HEADER_SIZE + len(payload), 0x21, m.b)
        return [(error.pack() + payload, fds), *rest]
    command = (Command.DMA_READ, Command.DMA_WRITE, m.b % 20)[m.a % 3]
    body = DmaAccessBody((m.a * 4096) % (1 << 33), m.b, bytes(m.b) if m.a % 2 else b"")
    own = Header(0x9000 + m.b, command, HEADER_SIZE + len(body.serialize()), (0, 0x10)[m.b % 2])
    return [(own.pack() + body.serialize(), []), (data, fds), *rest]


class MutatingServer(CaptureServer):
    """The capture server with :class:`Mutation` applied to chosen answers."""

    def __init__(self, capture: str, plan: list[Mutation]) -> None:
        super().__init__(capture, self.apply)
        self.plan = plan
        self.count = 0

    def apply(
        self, message: Message, recorded: bytes | None
    ) -> list[tuple[bytes, list[OwnedFd]]] | None:
        index = self.count
        self.count += 1
        chosen = [m for m in self.plan if m.at == index]
        if not chosen:
            return None
        sends: list[tuple[bytes, list[OwnedFd]]] = [
            (recorded if recorded is not None else self.fallback(message), [])
        ]
        for m in chosen:
            sends = mutate(m, sends)
        return sends


def run_trio(fn: Any, *args: Any) -> None:
    before = count_open_fds()
    trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))
    assert count_open_fds() == before, "an example leaked file descriptors"


@FUZZ
@given(
    capture=st.sampled_from([E1K, NVME, LVU, GPIO]),
    plan=mutations,
    reply_timeout=st.sampled_from([5.0, 0.5]),
)
def test_a_misbehaving_server_makes_realize_fail_cleanly_or_complete(
    capture: str, plan: list[Mutation], reply_timeout: float
) -> None:
    async def main() -> None:
        server = MutatingServer(capture, plan)
        with trio.fail_after(3600):  # virtual seconds: only a hang gets here
            async with serving(server, max_fds=16) as stream:
                try:
                    await realize(stream, RealizeOptions(reply_timeout=reply_timeout))
                except RealizeError as exc:
                    assert exc.step[:1] in "RS" and str(exc).startswith(exc.step)

    run_trio(main)


raw_commands = st.lists(
    st.tuples(
        st.integers(0, 20),
        st.sampled_from([0x0, 0x10, 0x1, 0x21]),
        st.binary(max_size=64),
        st.integers(0, 3),
    ),
    max_size=6,
)
#: a size no receiver frames: the header arrives alone (protocol.md §6 pitfall 20)
UNFRAMEABLE = 0xFFFFFFF0


@FUZZ
@given(
    commands=raw_commands,
    layout_=st.sampled_from(list(DmaLayout)),
    last_unframeable=st.booleans(),
)
def test_random_server_commands_never_break_the_dma_answerer(
    commands: list[tuple[int, int, bytes, int]], layout_: DmaLayout, last_unframeable: bool
) -> None:
    async def main() -> None:
        server = CaptureServer(E1K)
        with trio.fail_after(3600):
            async with (
                serving(server, client_layout=layout_) as stream,
                open_realize_client(stream, RealizeOptions(dma_layout=layout_)) as client,
            ):
                await client.realize()
                await client.reset()
                assert server.endpoint is not None
                out = server.endpoint.stream
                for i, (command, flags, payload, nfds) in enumerate(commands):
                    size = HEADER_SIZE + len(payload)
                    if last_unframeable and i == len(commands) - 1:
                        size, payload = UNFRAMEABLE, b""
                    header = Header(0xA000 + i, command, size, flags)
                    fds = random_fds(nfds)
                    try:
                        await out.send_message(header.pack() + payload, fds)
                    finally:
                        close_all(fds)
                client.memory.write_ram(0x200000, b"still here")
                try:
                    reply = await server.endpoint.request(
                        Command.DMA_READ, DmaAccessBody(0x200000, 10)
                    )
                except (ErrorReplyError, ReplyTimeoutError):
                    raise AssertionError("the client stopped answering DMA") from None
                assert reply.body.data == b"still here"

    run_trio(main)

"""Fuzzing the reference device server: random messages and messages mutated
from the real captures, with random fds, sent to a live session over a
socketpair. The session must answer every framable command (a reply or an
error reply), never crash or hang, log no internal error, and leak no fd."""

import struct

import hypothesis.strategies as st
import trio
from hypothesis import HealthCheck, given, settings

from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES, capture_messages
from vfioproxy.errors import ConnectionClosedError
from vfioproxy.io.fds import close_all, count_open_fds, make_eventfd, make_memfd
from vfioproxy.io.transport import fd_stream_pair
from vfioproxy.peers import layout as L
from vfioproxy.peers.server import ServerSession
from vfioproxy.protocol.codec import build_error_reply, build_reply, decode, encode
from vfioproxy.protocol.header import HEADER_STRUCT, Command, Header
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: QEMU's and libvfio-user's sample client's VERSION commands
QEMU_VERSION = next(capture_messages(TRACES / "qemu-realize-qemu-server-nvme-001.trace")).data
SAMPLE_VERSION = next(capture_messages(TRACES / "libvfio-user-client-server-001.trace")).data
#: the client commands (without VERSION) of whole real sessions: a QEMU realize
#: and the sample client's two migration connections, with their fds' kinds
SESSIONS = [
    [
        (m.data, tuple(fd.kind.value for fd in m.fds))
        for m in capture_messages(TRACES / f"{name}.trace")
        if m.direction is Direction.C2S and Header.parse(m.data).is_command
        and Header.parse(m.data).command != Command.VERSION
    ]
    for name in ("qemu-realize-qemu-server-e1000e-001", "libvfio-user-client-server-001",
                 "libvfio-user-client-server-migrated-001")
]
#: commands that make the device do things: map RAM, point DESC at it, ring
DOORBELL = [
    struct.pack("<IIQQQ", 32, 3, 0, 0, 0x10000),
    struct.pack("<QII", L.REG_DESC_LO, 0, 8) + struct.pack("<II", 0x100, 0),
    struct.pack("<QII", L.REG_DOORBELL, 0, 4) + b"\1\0\0\0",
]

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
small = st.integers(0, 0x11000)
commands = st.sampled_from([*Command, 0, 14, 19, 0xFFFF])
fd_kinds = st.lists(st.sampled_from(["eventfd", "memfd"]), max_size=3).map(tuple)


def framed(msg_id, command, flags, payload):
    return HEADER_STRUCT.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


@st.composite
def structured_payloads(draw, command):
    """Payloads of the right shape with hostile values, to reach past the parsers."""
    if command in (Command.REGION_READ, Command.REGION_WRITE):
        count = draw(st.integers(0, 64))
        head = struct.pack("<QII", draw(small | u64), draw(st.integers(0, 9) | u32), count)
        data = bytes(count) if command == Command.REGION_WRITE else b""
        return head + draw(st.sampled_from([data, data[:-1], b""]))
    if command == Command.DMA_MAP:
        return struct.pack("<IIQQQ", draw(st.sampled_from([32, 0])), draw(st.integers(0, 0x1F)),
                           draw(small), draw(small | u64), draw(small | u64))
    if command == Command.DMA_UNMAP:
        return struct.pack("<IIQQ", draw(st.sampled_from([24, 40, 0])),
                           draw(st.integers(0, 3)), draw(small), draw(small)) + draw(
            st.binary(max_size=24))
    if command == Command.DEVICE_SET_IRQS:
        count = draw(st.integers(0, 5))
        return struct.pack("<IIIII", 20, draw(st.integers(0, 0x3F)), draw(st.integers(0, 6)),
                           draw(st.integers(0, 5)), count) + draw(st.binary(max_size=count + 1))
    if command == Command.DEVICE_FEATURE:
        flags = draw(st.integers(0, 9)) | draw(st.sampled_from([0, 0x10000, 0x20000, 0x40000,
                                                                 0x30000, 0x50000, 0x80000]))
        return struct.pack("<II", draw(st.sampled_from([16, 64, 4096, 0])), flags) + draw(
            st.binary(max_size=32))
    if command in (Command.MIG_DATA_READ, Command.MIG_DATA_WRITE):
        size = draw(st.integers(0, 64))
        return struct.pack("<II", draw(st.sampled_from([8 + size, 0, 0xFFFFFFFF])), size) + (
            bytes(size) if command == Command.MIG_DATA_WRITE else b"")
    return draw(st.binary(max_size=48))


@st.composite
def random_messages(draw):
    command = draw(commands)
    flags = draw(st.sampled_from([0, 0, 0, 0x10, 0x1, 0x2, 0x20]))
    payload = draw(structured_payloads(command) | st.binary(max_size=40))
    return framed(draw(st.integers(0, 0xFFFF)), command, flags, payload), draw(fd_kinds)


@st.composite
def mutated(draw, message):
    """A captured message kept, bit-flipped, truncated or extended (its size fixed up)."""
    data, kinds = message
    data = bytearray(data)
    how = draw(st.sampled_from(["keep", "flip", "flip-header", "truncate", "extend"]))
    if how.startswith("flip"):
        low = 0 if how == "flip-header" or len(data) == 16 else 16
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(low, len(data) - 1).filter(lambda i: not 4 <= i < 8))
            data[at] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(16, len(data)))]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    data[4:8] = struct.pack("<I", len(data))
    return bytes(data), draw(st.just(kinds) | fd_kinds)


@st.composite
def mutated_sessions(draw):
    """A whole real session with a few of its commands mutated and random ones mixed in."""
    messages = list(draw(st.sampled_from(SESSIONS)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(messages) - 1))
        messages[at] = draw(mutated(messages[at]))
    for _ in range(draw(st.integers(0, 2))):
        messages.insert(draw(st.integers(0, len(messages))), draw(random_messages()))
    return messages


@st.composite
def unframable_headers(draw):
    size = draw(st.integers(0, 15) | st.integers((1 << 20) + 33, 0xFFFFFFFF))
    return HEADER_STRUCT.pack(draw(st.integers(0, 0xFFFF)), draw(commands), size, 0, 0), ()


def make_fds(kinds, size):
    return [make_eventfd() if kind == "eventfd" else make_memfd("fuzz", size) for kind in kinds]


async def serve_and_check(messages, *, memfd_size=0x10000, dma_answer="error", vanish=False):
    """Run one session over ``messages``; return how many replies came back."""
    before = count_open_fds()
    a, b = fd_stream_pair()
    session = ServerSession(b)
    ended = trio.Event()
    send_lock = trio.Lock()
    replies: list[int] = []

    async def serve():
        await session.run()
        ended.set()

    async def answer_dma(data):
        request = decode(data)
        if dma_answer == "error":
            reply = build_error_reply(request, 14)
        elif dma_answer == "garbage":
            reply = build_reply(request, request.body)
        else:
            reply = build_reply(request)
        async with send_lock:
            await a.send_message(encode(reply)[0])

    async def read():
        while True:
            try:
                data, fds = await a.receive_message()
            except (ConnectionClosedError, trio.ClosedResourceError):
                return
            close_all(fds)
            header = Header.parse(data)
            if header.is_command:
                await answer_dma(data)
            else:
                replies.append(header.msg_id)

    expected = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(read)
            for data, kinds in messages:
                fds = make_fds(kinds, memfd_size)
                async with send_lock:
                    await a.send_message(data, fds)
                close_all(fds)
                header = Header.parse(data)
                if header.type != 1 and not header.no_reply:
                    expected.append(header.msg_id)
            probe = framed(0xBEEF, Command.DEVICE_GET_INFO, 0, struct.pack("<IIII", 16, 0, 0, 0))
            async with send_lock:
                await a.send_message(probe)
            expected.append(0xBEEF)
            while len(replies) < len(expected):
                await trio.sleep(0.001)
            assert not ended.is_set(), "the session ended before the client closed"
            if vanish:
                with make_memfd("half", 8) as fd:
                    await a.send_message(framed(1, Command.DMA_MAP, 0, bytes(32))[:30], [fd])
            await a.aclose()
            await ended.wait()
    assert replies == expected, "one reply per framable command, in order"
    assert session.internal_errors == 0
    assert count_open_fds() == before
    return len(replies)


def with_version(messages, version):
    return ([(version, ())] if version else []) + messages


@FUZZ
@given(
    messages=st.lists(random_messages() | unframable_headers(), max_size=10),
    version=st.sampled_from([QEMU_VERSION, SAMPLE_VERSION, None]),
    memfd_size=st.sampled_from([0, 0x1000, 0x10000, 0x200000]),
    dma_answer=st.sampled_from(["error", "garbage", "empty"]),
    vanish=st.booleans(),
)
async def test_random_messages_get_answers_and_leave_the_server_intact(
    messages, version, memfd_size, dma_answer, vanish
):
    await serve_and_check(with_version(messages, version), memfd_size=memfd_size,
                          dma_answer=dma_answer, vanish=vanish)


@FUZZ
@given(
    messages=mutated_sessions(),
    version=st.sampled_from([QEMU_VERSION, SAMPLE_VERSION]),
    ram=st.sampled_from([None, ("memfd",), ()]),
    memfd_size=st.sampled_from([0x10000, 0x20000000]),
    dma_answer=st.sampled_from(["error", "garbage", "empty"]),
)
async def test_messages_mutated_from_real_captures_get_answers_and_leak_nothing(
    messages, version, ram, memfd_size, dma_answer
):
    if ram is not None:  # then map RAM (by memfd or by messages) and ring the doorbell
        messages += doorbell(ram)
    await serve_and_check(with_version(messages, version), memfd_size=memfd_size,
                          dma_answer=dma_answer)


def doorbell(ram_fds):
    commands = (Command.DMA_MAP, Command.REGION_WRITE, Command.REGION_WRITE)
    kinds = (ram_fds, (), ())
    return [(framed(0x100 + i, c, 0, p), k)
            for i, (c, p, k) in enumerate(zip(commands, DOORBELL, kinds, strict=True))]


async def test_the_fuzz_harness_sees_a_doorbell_complete():
    assert await serve_and_check([(SAMPLE_VERSION, ()), *doorbell(("memfd",))]) == 5

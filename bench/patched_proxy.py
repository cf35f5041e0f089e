"""Run a relay with monkeypatches: ablations that attribute the proxy's cost,
and candidate optimisations whose gain the benchmark measures.

    .venv/bin/python bench/patched_proxy.py PATCHES BASE --listen A --server B [-o TRACE]

``PATCHES`` is a comma-separated list of the names below (may be empty);
``BASE`` is ``record``, ``proxy``, ``proxy-nodecode`` or ``bare-trio``.
``proxy_overhead.py --experiments record+lazy-describe,...`` starts these.

Ablations (they remove work, to measure what it costs in place; not fixes):

- ``no-observe``: the digest does not decode or check (``SessionState.observe``
  returns a canned observation); the digest task, the queue and the writer stay.
- ``no-write``: ``TraceWriter.write_message`` writes nothing.

Candidate optimisations (the same bytes forwarded, the same trace records and
violations; ``bench/check_patches.py`` verifies that on the real captures):

- ``recv-one-yield`` (vfioproxy/transport.py): ``FdStream.receive_message``
  skips its trailing schedule point when it already waited for the socket to
  become readable (a wait is a schedule point and a cancel point already, as
  trio's own socket methods do it). Saves one pass of trio's run loop per
  message.
- ``send-no-yield`` (vfioproxy/transport.py): the pump's ``send_message``
  skips its trailing schedule point (the receive that always follows is one).
- ``lazy-describe`` (vfioproxy/protocol/session.py): ``SessionState.observe``
  formats ``Header.describe()`` only when a violation needs the text (today
  two to three times per message, ~1 us each); the header's type bits are
  read once.
- ``cached-limit`` (vfioproxy/protocol/session.py): ``max_message_size()`` is
  computed once per negotiation instead of once per received message.
- ``fast-record`` (recorder/writer.py, vfioproxy/proxy.py): the proxy appends
  its message records with a ``TraceWriter.append_message`` that packs the
  wire map directly instead of building and validating the ``MessageRecord``
  that ``write_message`` returns (the proxy ignores it, and its arguments are
  valid by construction): identical bytes on disk.
- ``writev-record`` (recorder/writer.py): ``fast-record`` that hands the
  message bytes to ``writev(2)`` after the packed head of the record instead
  of copying them into msgpack's output first (same bytes on disk).
- ``malloc-tune`` (vfioproxy/cli.py, at start-up): ``mallopt`` raises glibc's
  mmap and trim thresholds, so the MiB-sized objects of large messages are
  not faulted in afresh for every message.
- ``inline-digest`` (vfioproxy/proxy.py): the pump digests a message right
  after forwarding it instead of handing it to the digest task through a
  deque and a ``trio.Event`` (two task switches per message).

Measurement: ``instrument`` charges the thread CPU time of the syscalls, of
trio's epoll calls and of the digest's parts to named counters, written as
JSON on SIGUSR1 (``profile_proxy.py`` uses it).

The patches that replace functions copy them as they are at commit 087b116
(``FdStream.receive_message``, ``_read_header``, ``send_message``,
``SessionState.observe`` and its checkers): re-check them after those change.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import trio

import recorder.writer
import vfioproxy.protocol.session as session_module
import vfioproxy.proxy
import vfioproxy.transport
from recorder.errors import TraceLimitError
from recorder.limits import DEFAULT_LIMITS
from recorder.records import FdRecord
from vfioproxy.errors import ConnectionClosedError, FdsTruncatedError
from vfioproxy.fds import OwnedFd, fd_number
from vfioproxy.protocol.bodies import RawBody, VersionBody
from vfioproxy.protocol.codec import decode
from vfioproxy.protocol.header import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    SERVER_COMMANDS,
    Command,
    Header,
    MessageType,
    framed_body_length,
)
from vfioproxy.protocol.session import Observation, SessionState, Violation
from vfioproxy.side import Direction

_SIZE_FIELD = vfioproxy.transport._SIZE_FIELD
_RECV_FLAGS = vfioproxy.transport._RECV_FLAGS
_take_fds = vfioproxy.transport._take_fds
_SEND_FLAGS = vfioproxy.transport._SEND_FLAGS
FdStream = vfioproxy.transport.FdStream


# ----------------------------------------------------------------------------- ablations


def patch_no_observe() -> None:
    message = decode(Header(0, Command.REGION_READ, 32).pack() + bytes(16))
    canned = Observation(Direction.C2S, 0, message)

    def observe(self: SessionState, direction: Direction, data: Any, fds: Any = ()) -> Observation:
        return canned

    SessionState.observe = observe  # type: ignore[method-assign]


def patch_no_write() -> None:
    def write_message(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    recorder.writer.TraceWriter.write_message = write_message  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- transport


async def _read_header_waited(self: Any) -> tuple[bytes, list[OwnedFd], bool]:
    """FdStream._read_header (as of HEAD), also saying whether it waited for readability."""
    raw = self._raw
    fds: list[OwnedFd] = []
    header = bytearray()
    waited = False
    try:
        while True:
            try:
                chunk, ancdata, flags, _ = raw.recvmsg(
                    HEADER_SIZE - len(header), self._ancbufsize, _RECV_FLAGS
                )
            except BlockingIOError:
                waited = True
                await trio.lowlevel.wait_readable(raw)
                continue
            if ancdata:
                _take_fds(ancdata, fds)
            if flags & socket.MSG_CTRUNC:
                header += chunk
                raise FdsTruncatedError(
                    f"a message header arrived with more fds than fit (max_fds="
                    f"{self.max_fds}) or than this process may open; the kernel "
                    f"dropped the rest and the {len(fds)} that arrived were closed"
                )
            if len(chunk) == HEADER_SIZE:
                return chunk, fds, waited
            if not chunk:
                if not header:
                    raise ConnectionClosedError("peer closed the connection", mid_message=False)
                raise ConnectionClosedError(
                    f"peer closed the connection after {len(header)} of "
                    f"{HEADER_SIZE} header bytes",
                    mid_message=True,
                    received=len(header),
                    partial=bytes(header),
                )
            header += chunk
            if len(header) == HEADER_SIZE:
                return bytes(header), fds, waited
    except ConnectionResetError as exc:
        self._fail_receive("receiving a header", fds, len(header), HEADER_SIZE, exc)
        raise ConnectionClosedError(
            f"peer reset the connection after {len(header)} of {HEADER_SIZE} header bytes",
            mid_message=bool(header),
            received=len(header),
        ) from exc
    except BaseException as exc:
        self._fail_receive("receiving a header", fds, len(header), HEADER_SIZE, exc)
        self._raise_if_closed(exc)
        raise


def patch_recv_one_yield() -> None:
    async def receive_message(
        self: Any, max_size: int = vfioproxy.transport.DEFAULT_MAX_MESSAGE_SIZE
    ) -> tuple[bytes, list[OwnedFd]]:
        self._begin_receive()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            message, fds, waited = await _read_header_waited(self)
            body_len = framed_body_length(_SIZE_FIELD.unpack_from(message, 4)[0], max_size)
            if body_len:
                try:
                    first, rest = await self._read_body(body_len, HEADER_SIZE)
                except BaseException as exc:
                    for fd in fds:
                        fd.close()
                    if isinstance(exc, ConnectionClosedError):
                        exc.partial = message + exc.partial
                    raise
                message = message + first if rest is None else b"".join((message, first, rest))
        finally:
            self._receiving = False
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return message, fds

    FdStream.receive_message = receive_message  # type: ignore[method-assign]


def patch_send_no_yield() -> None:
    """The pump's sends without their trailing schedule point.

    In the pump a send is always followed by a receive, which is a schedule
    point of its own (it waits, or ends with one), so the send's is only
    extra. Only streams a pump writes to skip it (``FdStream.send_message``
    as of HEAD otherwise); the proposed API is a ``schedule=False`` flag.
    """
    original_pump = vfioproxy.proxy.Proxy._pump

    async def pump(self: Any, session: Any, direction: Any, src: Any, dst: Any,
                   *args: Any) -> None:
        dst._pump_send = True
        await original_pump(self, session, direction, src, dst, *args)

    vfioproxy.proxy.Proxy._pump = pump  # type: ignore[method-assign]
    original_send = FdStream.send_message

    async def send_message(self: Any, data: Any, fds: Sequence[Any] = ()) -> None:
        if not getattr(self, "_pump_send", False):
            return await original_send(self, data, fds)  # type: ignore[no-any-return]
        self._check_usable()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this FdStream")
        view = memoryview(data).cast("B")
        total = len(view)
        if fds and not total:
            raise ValueError("fds need at least one byte of data to travel with")
        ancdata = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", map(fd_number, fds)))] if fds else []
        )
        await trio.lowlevel.checkpoint_if_cancelled()
        raw = self._raw
        self._sending = True
        sent = 0
        try:
            while True:
                try:
                    sent = raw.sendmsg([view], ancdata, _SEND_FLAGS)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
            while sent < total:
                try:
                    sent += raw.send(view[sent:], _SEND_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
        except (BrokenPipeError, ConnectionResetError) as exc:
            if sent:
                self._break("sending a message", sent, total, exc)
            raise ConnectionClosedError(
                f"peer closed the connection; sent {sent} of {total} message bytes",
                mid_message=sent > 0,
            ) from exc
        except BaseException as exc:
            if sent:
                self._break("sending a message", sent, total, exc)
            self._raise_if_closed(exc)
            raise
        finally:
            self._sending = False

    FdStream.send_message = send_message  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- session


def patch_lazy_describe() -> None:
    """``observe`` as it is, with the header's text made only for a violation."""
    reply_type = int(MessageType.REPLY)
    command_type = int(MessageType.COMMAND)

    def observe(
        self: SessionState, direction: Direction, data: Any, fds: Any = ()
    ) -> Observation:
        index = self._counts[direction]
        self._counts[direction] = index + 1
        sender = direction.sender
        problems: list[Violation] = []
        header = Header.parse(data)

        def violation(kind: str, text: str, command: str | None = None, **where: Any) -> None:
            name = header.describe() if command is None else command
            problems.append(Violation(kind, sender, index, name, text, **where))

        mtype = header.flags & 0x0F
        self._check_header(header, len(data), violation)
        request = None
        if mtype == reply_type:
            request = self._match_reply(direction, header, violation)
        message = decode(data, fds, sender=sender, dialects=self.dialects, request=request)
        if isinstance(message.body, RawBody) and message.body.reason and header.size == len(data):
            violation("decode_error", message.body.reason)
        if mtype == command_type:
            self._check_command(direction, index, message, violation)
        if fds:
            self._check_fds(direction, header, len(fds), violation)
        if header.command == Command.VERSION and isinstance(message.body, VersionBody):
            self._negotiate(header, message.body)
        if self.strict and problems:
            raise problems[0].as_error()
        return Observation(direction, index, message, request, tuple(problems))

    def check_header(self: SessionState, header: Header, length: int, violation: Any) -> None:
        size = header.size
        if size < HEADER_SIZE:
            violation("size_too_small", "size below the 16-byte header",
                      field="size", offset=4, expected=">= 16", got=size)
        elif size != length:
            violation("size_too_large", "size above the negotiated maximum",
                      field="size", offset=4, expected=f"<= {self.max_message_size()}", got=size)
        flags = header.flags
        mtype = flags & 0x0F
        if mtype not in (command_type, reply_type):
            violation("invalid_flags", "invalid message type",
                      field="flags", offset=8, expected="type 0 or 1", got=flags)
        elif flags & ~KNOWN_FLAGS:
            violation("invalid_flags", "unknown flag bits set", field="flags", offset=8,
                      expected=f"bits within {KNOWN_FLAGS:#x}", got=flags)
        elif mtype == command_type and header.is_error:
            violation("invalid_flags", "error flag on a command", field="flags", offset=8,
                      got=flags)
        elif mtype == reply_type and header.no_reply:
            violation("invalid_flags", "no_reply flag on a reply", field="flags", offset=8,
                      got=flags)

    def check_command(
        self: SessionState, direction: Direction, index: int, message: Any, violation: Any
    ) -> None:
        header = message.header
        from_server = header.command in SERVER_COMMANDS
        if from_server != (direction is Direction.S2C):
            violation(
                "wrong_direction", f"{header.command_name} sent by the {direction.sender.value}",
                field="command", offset=2,
                expected=f"sent by the {'server' if from_server else 'client'}",
                got=direction.sender.value,
            )
        if direction is Direction.C2S and index == 0 and header.command != Command.VERSION:
            violation(
                "version_not_first", "the first client message must be VERSION",
                field="command", offset=2, expected="VERSION", got=header.command_name,
            )
        self._check_count(direction, message, violation)
        if header.no_reply:
            self._posted[direction].append((header.msg_id, message))
            return
        queue = self._pending[direction].setdefault(header.msg_id, deque())
        if queue:
            violation(
                "duplicate_outstanding_id",
                f"msg_id {header.msg_id} is still outstanding "
                f"({queue[0].message.header.command_name} #{queue[0].index})",
                field="msg_id", offset=0, got=header.msg_id,
            )
        queue.append(session_module._Pending(index, message))

    SessionState.observe = observe  # type: ignore[method-assign]
    SessionState._check_header = check_header  # type: ignore[method-assign]
    SessionState._check_command = check_command  # type: ignore[method-assign]


def patch_cached_limit() -> None:
    original_negotiate = SessionState._negotiate
    original_limit = SessionState.max_message_size

    def max_message_size(self: SessionState) -> int:
        try:
            return self.__dict__["_cached_limit"]  # type: ignore[no-any-return]
        except KeyError:
            limit = original_limit(self)
            self.__dict__["_cached_limit"] = limit
            return limit

    def negotiate(self: SessionState, header: Any, body: Any) -> None:
        original_negotiate(self, header, body)
        self.__dict__.pop("_cached_limit", None)

    SessionState.max_message_size = max_message_size  # type: ignore[method-assign]
    SessionState._negotiate = negotiate  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- recorder


def _bin_header(n: int) -> bytes:
    """The msgpack header of a bin object of ``n`` bytes."""
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def patch_fast_record(writev: bool = False) -> None:
    max_record = DEFAULT_LIMITS.max_record_bytes
    max_fds = DEFAULT_LIMITS.max_fds
    write, writev_fn = recorder.writer.os.write, os.writev

    def append_message(
        self: Any,
        session: int,
        direction: Direction,
        t_ns: int,
        data: bytes,
        fds: Sequence[FdRecord] = (),
    ) -> None:
        """write_message without building the MessageRecord it returns."""
        if len(fds) > max_fds:
            raise TraceLimitError(f"{len(fds)} fds exceed max_fds ({max_fds})", limit="max_fds")
        seq = self._seq + 1
        wire = {
            "k": "m", "q": seq, "s": session, "d": direction.value, "t": t_ns,
            "f": [fd.to_wire() for fd in fds], "b": b"" if writev else data,
        }
        if writev:
            # the message bytes go to the kernel as they are, after the record's
            # head (the same bytes as packing them: "b" is the last field)
            head = self._packer.pack(wire)[:-2] + _bin_header(len(data))
            parts = [head, data]
        else:
            parts = [self._packer.pack(wire)]
        total = sum(map(len, parts))
        if total > max_record:
            raise TraceLimitError(
                f"record of {total} bytes exceeds max_record_bytes ({max_record})",
                limit="max_record_bytes",
            )
        if self._fd < 0:
            raise ValueError(f"cannot write to {self.path}: the TraceWriter is closed")
        try:
            written = writev_fn(self._fd, parts) if writev else write(self._fd, parts[0])
            if written < total:
                rest = b"".join(parts)
                while written < total:
                    written += write(self._fd, memoryview(rest)[written:])
            if self._fsync:
                os.fsync(self._fd)
        except BaseException:
            self._cut_back()
            raise
        self._size += total
        self._seq = seq

    recorder.writer.TraceWriter.append_message = append_message  # type: ignore[attr-defined]
    original_digest = vfioproxy.proxy.Proxy._digest

    def digest(self: Any, session: Any, *args: Any) -> None:
        # the proxy ignores the record write_message returns: let it append only
        if self.sink is not None:
            writer = self.sink.writer_for(session.id)
            writer.write_message = writer.append_message
        original_digest(self, session, *args)

    vfioproxy.proxy.Proxy._digest = digest  # type: ignore[method-assign]


def patch_malloc_tune() -> None:
    """Keep glibc from returning freed MiB-sized blocks to the kernel at once.

    A 1 MiB message makes several short-lived 1 MiB objects (the received
    message, decode's payload and data slices, msgpack's output). Above glibc's
    mmap and trim thresholds each of them is mmapped (or the heap top trimmed)
    and faulted in page by page again for the next message. Raising the
    thresholds (32 MiB, the most ``mallopt`` takes for mmap; 128 MiB to trim)
    keeps that memory in the heap; RSS then keeps up to that much free memory.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 128 << 20)):
        raise SystemExit("mallopt failed")


# ----------------------------------------------------------------------------- proxy


def patch_inline_digest() -> None:
    def queue_forwarded(
        self: Any, session: Any, direction: Direction, t_ns: int, data: bytes, fds: Any
    ) -> None:
        fd_info: list[FdRecord] | int = len(fds)
        if fds and self.sink is not None:
            limit = self.options.capture_fd_contents
            fd_info = [
                vfioproxy.proxy.fd_record(fd, i, contents_limit=limit) for i, fd in enumerate(fds)
            ]
        if session.backlog:  # never overtake what is queued (at start-up only)
            self._digest_backlog(session, raise_strict=True)
        self._digest(session, direction, t_ns, data, fd_info)

    vfioproxy.proxy.Proxy._queue_forwarded = queue_forwarded  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- instrument


class Meter:
    """CPU time spent in each wrapped call, in ns, and how often it was called."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        #: what one wrapped call costs on top of the call itself, and how much of
        #: that lands inside the timed window (measured at start-up)
        self.wrapper_ns = 0.0
        self.bias_ns = 0.0

    def add(self, name: str, ns: int) -> None:
        self.ns[name] = self.ns.get(name, 0) + ns
        self.calls[name] = self.calls.get(name, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "ns": dict(self.ns),
            "calls": dict(self.calls),
            "wrapper_ns": self.wrapper_ns,
            "bias_ns": self.bias_ns,
        }


METER = Meter()


def _timed(name: str, fn: Callable[..., Any], eagain: bool = False) -> Callable[..., Any]:
    """``fn``, charging the thread CPU time of each call to ``name`` (``name EAGAIN``
    for calls that fail with BlockingIOError, when ``eagain``)."""
    add = METER.add
    clock = time.thread_time_ns

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        except BlockingIOError:
            if eagain:
                add(name + " EAGAIN", clock() - t0)
                t0 = -1
            raise
        finally:
            if t0 >= 0:
                add(name, clock() - t0)

    return wrapper


def patch_instrument() -> None:
    """Time the syscalls, trio's epoll calls and the digest's parts in place.

    Thread CPU time (``CLOCK_THREAD_CPUTIME_ID``), so neither sleeping in
    ``epoll_wait`` nor being preempted inside a call counts. On SIGUSR1 the
    totals go as JSON to the file named by ``$VFIOPROXY_BENCH_METER``.
    """
    import _socket

    import trio._core._io_epoll as io_epoll

    sock = socket.socket
    sock.recvmsg = _timed("recvmsg", _socket.socket.recvmsg, eagain=True)  # type: ignore
    sock.recv = _timed("recv", _socket.socket.recv, eagain=True)  # type: ignore
    sock.sendmsg = _timed("sendmsg", _socket.socket.sendmsg)  # type: ignore
    manager = io_epoll.EpollIOManager
    manager.get_events = _timed("epoll_wait", manager.get_events)  # type: ignore[method-assign]
    manager._update_registrations = _timed(  # type: ignore[method-assign]
        "epoll_ctl", manager._update_registrations)
    SessionState.observe = _timed("observe", SessionState.observe)  # type: ignore
    writer = recorder.writer.TraceWriter
    writer.write_message = _timed("record", writer.write_message)  # type: ignore
    if hasattr(writer, "append_message"):  # fast-record
        writer.append_message = _timed("record", writer.append_message)
    writer._append = _timed("record: pack + write", writer._append)  # type: ignore
    recorder.writer.os = _OsWithTimedWrite()  # type: ignore[assignment]
    vfioproxy.proxy.fd_record = _timed("fd inspection", vfioproxy.proxy.fd_record)

    def noop() -> None:
        return None

    timed_noop = _timed("calibration", noop)
    n = 20000
    t0 = time.thread_time_ns()
    for _ in range(n):
        timed_noop()
    wrapped = time.thread_time_ns() - t0
    t0 = time.thread_time_ns()
    for _ in range(n):
        noop()
    plain = time.thread_time_ns() - t0
    METER.wrapper_ns = (wrapped - plain) / n
    METER.bias_ns = METER.ns.pop("calibration") / n
    del METER.calls["calibration"]

    def dump(signum: int, frame: Any) -> None:
        path = os.environ.get("VFIOPROXY_BENCH_METER")
        if path:
            with open(path, "w") as f:
                json.dump(METER.snapshot(), f)

    signal.signal(signal.SIGUSR1, dump)


class _OsWithTimedWrite:
    """``os`` for recorder.writer, with ``write`` timed."""

    def __init__(self) -> None:
        self.write = _timed("record: write(2)", os.write)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


PATCHES: dict[str, Callable[[], None]] = {
    "no-observe": patch_no_observe,
    "no-write": patch_no_write,
    "recv-one-yield": patch_recv_one_yield,
    "send-no-yield": patch_send_no_yield,
    "lazy-describe": patch_lazy_describe,
    "cached-limit": patch_cached_limit,
    "fast-record": patch_fast_record,
    "writev-record": lambda: patch_fast_record(writev=True),
    "malloc-tune": patch_malloc_tune,
    "inline-digest": patch_inline_digest,
    "instrument": patch_instrument,
}


def apply(names: Sequence[str]) -> None:
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    patches, base, *rest = argv
    apply([p for p in patches.split(",") if p])
    if base == "bare-trio":
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
        import bare_relay

        if "send-no-yield" in patches:
            original = bare_relay.pump

            async def pump(src: Any, dst: Any, done: Any) -> None:
                dst._pump_send = True
                await original(src, dst, done)

            bare_relay.pump = pump
        sys.argv = ["bare_relay", *rest]
        bare_relay.main()
        return 0
    from vfioproxy.cli import main as cli_main

    command = {"record": ["record"], "proxy": ["proxy"], "proxy-nodecode": ["proxy", "--no-decode"]}
    if base not in command:
        raise SystemExit(f"unknown base {base!r}")
    return cli_main([*command[base], *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One numbering, what was sent, and the views: ``trace show`` (and ``-v``), the
proxy's live view (``-v``, with the status line), ``trace stats``, over real
sockets, fds and trace files."""

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import time

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord, TraceHeader, arrived_bytes
from recorder.sink import TraceSink
from recorder.writer import TraceWriter
from tests.conftest import FD_HYGIENE
from tests.test_cli_live import VFIOPROXY, wait_for_socket
from tests.test_proxy_inject import connect, read_cmd, roundtrip
from vfioproxy.inject import Injector
from vfioproxy.protocol.bodies import RegionAccessBody, VersionBody
from vfioproxy.protocol.codec import build_command, build_error_reply, build_reply, decode
from vfioproxy.protocol.codec import encode as encode_with_fds
from vfioproxy.protocol.header import Command, Header
from vfioproxy.protocol.listing import errno_text
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.proxy.live import MessageLog, StatusLine
from vfioproxy.side import Direction
from vfioproxy.trace import show, stats
from vfioproxy.trace.decoded import DecodedMessage, decoded_records

pytestmark = FD_HYGIENE


@pytest.fixture(params=["threads", "trio"])
def options(request):
    """Both ways of forwarding: the session threads and trio tasks."""
    return ProxyOptions(threads=request.param == "threads")


def decoded(path):
    with TraceReader(path) as reader:
        return list(decoded_records(reader))


def json_objects(path):
    """``trace show --json``'s objects of the trace at ``path``."""
    out = io.StringIO()
    show.write_json(map(show.json_object, decoded(path)), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def shown(path, verbose=False):
    return list(show.text_lines(decoded(path), verbose=verbose))


def encode(message):
    return encode_with_fds(message)[0]


def version_exchange(writer):
    """What a trace starts with: VERSION, and its reply (seq 1 and 2)."""
    writer.append_message(1, Direction.C2S, 0, VERSION, ())
    writer.append_message(1, Direction.S2C, 0, encode(build_reply(
        decode(VERSION), VersionBody.build(0, 0, None))), ())


VERSION = encode(build_command(Command.VERSION, 0, VersionBody.build(0, 0, None)))


async def session(tmp_path, server, options, *, rules=(), sink=None, observer=None):
    """VERSION (id 0), then two REGION_READs (ids 1 and 2) through the proxy."""
    injector = Injector(list(rules)) if rules else None
    async with open_proxy(tmp_path / "p.sock", server.path, options=options, sink=sink,
                          injector=injector, observer=observer) as proxy:
        client = await connect(tmp_path)
        async with client:
            await roundtrip(client, VERSION)
            replies = [await roundtrip(client, read_cmd(1, offset=0x10)),
                       await roundtrip(client, read_cmd(2, offset=0x3c, count=1))]
        with trio.fail_after(5):
            await proxy.wait_sessions()
    return replies


# ------------------------------------------------------------------ one numbering


def test_a_header_names_its_msg_id_as_id_never_as_a_number_sign():
    header = Header.parse(read_cmd(13))
    assert header.describe() == "REGION_READ cmd id=13"


async def test_show_the_live_view_and_inject_events_number_a_message_alike(
        raw_server, tmp_path, options):
    trace = tmp_path / "t.trace"
    out = io.StringIO()
    with TraceSink(trace) as sink:
        await session(tmp_path, raw_server, options, sink=sink, observer=MessageLog(out),
                      rules=["c2s REGION_READ index=1 delay 1us"])
    listed = shown(trace)
    live = out.getvalue().splitlines()
    # the same line but for the time column: seq first, then direction, session, header
    strip = re.compile(r"^( *\d+) +[\d.]+ ")
    messages = [strip.sub(r"\1 ", line) for line in listed
                if " --- " not in line and not line.startswith("#")]
    assert [strip.sub(r"\1 ", line) for line in live] == messages
    assert messages[2].split()[:6] == ["4", "c2s", "s1", "REGION_READ", "cmd", "id=1"]
    # the inject event names the message by its seq and its direction index
    (inject,) = [line for line in listed if " inject " in line]
    seq = int(listed[listed.index(inject) - 1].split()[0])
    assert inject.endswith(f"inject #{seq} c2s[1]: rule 1 delay fixed(1us) = 1.0 us")


async def test_proxy_v_without_a_trace_numbers_messages_as_the_trace_would(
        raw_server, tmp_path, options):
    recorded, unrecorded = io.StringIO(), io.StringIO()
    rules = ["s2c REGION_READ index=1 delay 1us"]
    with TraceSink(tmp_path / "t.trace") as sink:
        await session(tmp_path, raw_server, options, sink=sink, observer=MessageLog(recorded),
                      rules=rules)
    await session(tmp_path, raw_server, options, observer=MessageLog(unrecorded), rules=rules)
    seqs = [[int(line.split()[0]) for line in out.getvalue().splitlines()]
            for out in (recorded, unrecorded)]
    # session_open is 1; the delayed reply's inject event takes the seq after it
    assert seqs[0] == seqs[1] == [2, 3, 4, 5, 7, 8]


def test_errno_text_gives_the_number_and_its_name():
    assert errno_text(22) == "22 (EINVAL)"
    assert errno_text(4095) == "4095"


# ------------------------------------------------------------------ what was sent


async def test_a_rewritten_message_is_recorded_as_the_receiver_got_it_and_as_it_arrived(
        raw_server, tmp_path, options):
    trace = tmp_path / "t.trace"
    with TraceSink(trace) as sink:
        await session(tmp_path, raw_server, options, sink=sink,
                      rules=["c2s REGION_READ index=1 corrupt offset mask=0xff"])
    with TraceReader(trace) as reader:
        records = list(reader)
    first = [r for r in records if isinstance(r, MessageRecord)][2]
    inject = records[records.index(first) + 1]
    assert isinstance(inject, EventRecord) and inject.kind == "inject"
    # the record holds what the server got (and answered), the event what the client sent
    (_, got, _) = raw_server.received[1]
    assert first.data == read_cmd(1, offset=0x10 ^ 0xFF)
    assert got.msg_id == 1 and decode(first.data).body.offset == 0x10 ^ 0xFF
    assert arrived_bytes(first.data, inject.data["arrived"]) == read_cmd(1, offset=0x10)
    lines = shown(trace)
    line = next(i for i, text in enumerate(lines) if " c2s s1 REGION_READ cmd id=1" in text)
    assert "@0xef" in lines[line]  # the offset the server got
    assert lines[line + 1].strip() == (
        "~~~ rewritten by the proxy (rule 1 corrupt offset mask=0xff): at offset 16 (0x10) "
        "10 arrived, ef was sent")
    assert lines[line + 2].endswith("inject #4 c2s[1]: rule 1 corrupt offset mask=0xff "
                                    "at offset 16 (0x10)")
    verbose = shown(trace, verbose=True)
    assert any(text.strip() == "as it arrived: 32 bytes" for text in verbose)
    objects = json_objects(trace)
    (obj,) = [o for o in objects if o.get("seq") == first.seq]
    assert obj["hex"] == first.data.hex() and obj["arrived"] == read_cmd(1, offset=0x10).hex()
    assert (obj["msg_id"], obj["index"]) == (1, 1)


async def test_the_correct_answer_to_a_rewritten_request_is_no_violation(
        raw_server, tmp_path, options):
    trace = tmp_path / "t.trace"
    with TraceSink(trace) as sink:
        await session(tmp_path, raw_server, options, sink=sink,
                      rules=["c2s REGION_READ index=1 corrupt msg_id mask=0x40"])
    # the server answered id 0x41, the id it got: the trace says so, and nothing is wrong
    assert not stats.violations_by_session(decoded(trace))
    replies = [item for item in decoded(trace) if isinstance(item, DecodedMessage)
               and item.record.direction is Direction.S2C]
    assert replies[1].observation.message.header.msg_id == 0x41
    assert replies[1].latency_ns is not None


async def test_a_violation_the_injection_caused_is_attributed_to_it(
        raw_server, tmp_path, options):
    trace = tmp_path / "t.trace"
    out = io.StringIO()
    with TraceSink(trace) as sink:
        await session(tmp_path, raw_server, options, sink=sink, observer=MessageLog(out),
                      rules=["s2c REGION_READ index=1 corrupt msg_id mask=0x40"])
    # the live view blames it too, under the line of the message as the client got it
    live = out.getvalue().splitlines()
    (blamed,) = [i for i, line in enumerate(live) if "!!!" in line]
    assert " s2c s1 REGION_READ reply id=65 " in live[blamed - 1]
    assert live[blamed].strip().startswith(
        "!!! caused by the proxy's injection (rule 1 corrupt msg_id mask=0x40), not the server")
    (violation,) = [v for item in decoded(trace) if isinstance(item, DecodedMessage)
                    for v in item.observation.violations]
    assert violation.kind == "unknown_reply_id"
    assert violation.caused_by == "rule 1 corrupt msg_id mask=0x40"
    assert str(violation).startswith(
        "caused by the proxy's injection (rule 1 corrupt msg_id mask=0x40), not the server: "
        "server message s2c[1] (REGION_READ reply id=65)")
    (line,) = [text for text in shown(trace) if "!!!" in text]
    assert "caused by the proxy's injection (rule 1 corrupt msg_id mask=0x40)" in line
    (obj,) = [obj for obj in json_objects(trace) if obj.get("violations")]
    assert obj["violations"][0]["caused_by"] == "rule 1 corrupt msg_id mask=0x40"


def test_an_answer_to_a_rewritten_request_carries_the_blame_too(tmp_path):
    """Written by hand: a request the proxy rewrote, then a reply that breaks a rule."""
    trace = tmp_path / "t.trace"
    sent = read_cmd(1, offset=0xEF)
    request = decode(sent)
    assert request.body.offset == 0xEF
    reply = Header(1, Command.REGION_WRITE, 16, 1, 0).pack()  # the wrong command
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        version_exchange(writer)
        writer.append_message(1, Direction.C2S, 1, sent, (), events=[("inject", {
            "direction": "c2s", "index": 1,
            "applied": [{"rule": 1, "action": "corrupt", "text": "corrupt offset mask=0xff",
                         "value": 16}],
            "arrived": {"offset": 16, "length": 1, "data": b"\x10"}})])
        writer.append_message(1, Direction.S2C, 2, reply, ())
    violations = [v for item in decoded(trace) if isinstance(item, DecodedMessage)
                  for v in item.observation.violations]
    assert violations and all(v.caused_by == "rule 1 corrupt offset mask=0xff"
                              for v in violations)


def test_an_inject_event_without_arrived_bytes_reads_as_before(tmp_path):
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        version_exchange(writer)
        writer.append_message(1, Direction.C2S, 1, read_cmd(1), (), events=[("inject", {
            "direction": "c2s", "index": 1,
            "applied": [{"rule": 1, "action": "corrupt", "text": "corrupt offset",
                         "value": 24}]})])
        writer.append_message(1, Direction.S2C, 2, Header(1, Command.REGION_WRITE, 16, 1, 0)
                              .pack(), ())
    items = [i for i in decoded(trace) if isinstance(i, (DecodedMessage, EventRecord))]
    (message, event, reply) = items[2:]
    assert message.injection is event and message.arrived is None
    (violation,) = reply.observation.violations
    assert violation.kind == "reply_command_mismatch" and violation.caused_by is None
    lines = shown(trace)
    assert not any("~~~" in line for line in lines)
    assert lines[4].endswith("inject #3 c2s[1]: rule 1 corrupt offset at offset 24 (0x18)")


# ------------------------------------------------------------------ the live view


async def test_message_lines_are_written_above_the_status_line(raw_server, tmp_path, options):
    terminal = io.StringIO()  # stdout and stderr on one terminal
    status = StatusLine(terminal)
    status.show("sessions 0/0")
    await session(tmp_path, raw_server, options, observer=MessageLog(terminal, status))
    text = terminal.getvalue()
    chunks = text.split("\r\x1b[K")
    assert chunks[0] == "" and chunks[1] == "sessions 0/0"
    # each message line: the status line cleared, the line, the status line drawn again
    assert len(chunks) == 2 + 6
    for chunk in chunks[2:]:
        line, again = chunk.split("\n")
        assert " c2s s1 " in line or " s2c s1 " in line
        assert again == "sessions 0/0"
    status.show("")
    assert terminal.getvalue().endswith("\r\x1b[K")


# ------------------------------------------------------------------ show -v and stats


def test_show_verbose_dumps_payloads_sixteen_bytes_a_line_and_names_errnos(tmp_path):
    trace = tmp_path / "t.trace"
    data = bytes(range(0x30, 0x30 + 20))
    command = build_command(Command.REGION_WRITE, 3, RegionAccessBody(0, 7, len(data), data))
    error = build_error_reply(decode(encode(command)), 22)
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        version_exchange(writer)
        writer.append_message(1, Direction.C2S, 1, encode(command), ())
        writer.append_message(1, Direction.S2C, 2, encode(error), ())
    lines = [line.strip() for line in shown(trace, verbose=True)]
    assert "payload: 36 bytes" in lines
    assert "0010  00 00 00 00 00 00 00 00 07 00 00 00 14 00 00 00  |................|" in lines
    assert "0020  30 31 32 33 34 35 36 37 38 39 3a 3b 3c 3d 3e 3f  |0123456789:;<=>?|" in lines
    assert "0030  40 41 42 43                                      |@ABC|" in lines
    assert ("header: msg_id=3 command=REGION_WRITE (10) size=16 flags=0x21 "
            "error=22 (EINVAL)") in lines


def test_stats_tables_are_laid_out_in_columns(tmp_path):
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        for i in range(1, 4):
            writer.append_message(1, Direction.C2S, 10 * i, read_cmd(i), ())
            writer.append_message(1, Direction.S2C, 10 * i + 7, encode(build_reply(
                decode(read_cmd(i)), RegionAccessBody(0, 7, 4, b"\xab" * 4))), ())
    lines = stats.text_report(stats.collect(decoded(trace)))
    head = lines.index("request -> reply latency (us)")
    header, rule, row = lines[head + 1:head + 4]
    assert header.split() == ["command", "n", "p50", "p90", "p99", "max"]
    assert set(rule) == {"─"} and row.split() == ["REGION_READ", "3", "0.0", "0.0", "0.0", "0.0"]
    # numbers are right-aligned under their heading
    assert len(header) == len(row) and header.endswith("max") and row.endswith("0.0")
    traffic = lines[2:7]
    assert traffic[0].split() == ["command", "dir", "kind", "msgs", "bytes"]
    assert [line.split() for line in traffic[2:4]] == [
        ["REGION_READ", "c2s", "command", "3", "96"], ["REGION_READ", "s2c", "reply", "3", "108"]]
    assert len({len(line) for line in traffic if not set(line) <= {"─"}}) == 1


# ------------------------------------------------------------------ proxy -v on a terminal


def test_proxy_v_on_a_terminal_shows_message_lines_and_the_status_line(tmp_path):
    """``proxy -v`` with stdout and stderr on one terminal (a pty): the message
    lines, as ``trace show`` numbers them, and the status line below them."""
    device, listen = tmp_path / "dev.sock", tmp_path / "p.sock"
    server = subprocess.Popen([*VFIOPROXY, "serve-device", "--socket", str(device)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    master, slave = pty.openpty()
    proxy = subprocess.Popen([*VFIOPROXY, "proxy", "-v", "--listen", str(listen),
                              "--server", str(device)], stdout=slave, stderr=slave,
                             stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""

    def read_until(predicate):
        nonlocal seen
        deadline = time.monotonic() + 30
        while not predicate(seen) and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)
        return predicate(seen)

    try:
        wait_for_socket(device, server)
        assert read_until(lambda out: b"listening on" in out)
        realize = subprocess.run([*VFIOPROXY, "realize", "--socket", str(listen)],
                                 capture_output=True, text=True, timeout=60)
        assert realize.returncode == 0, realize.stderr
        # the status line comes once a second: wait for one that has counted the session
        assert read_until(lambda out: b"sessions 0/1 | c2s 48 msg" in out), seen
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.wait(timeout=30)
        read_until(lambda out: b"session(s)" in out)
        os.close(master)
        server.kill()
        server.communicate()
    text = seen.decode()
    lines = [line.split("\r\x1b[K")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    # numbered as the trace would number them: session_open is 1, the VERSION pair 2 and 3
    assert any(line.startswith("     2 ") and " c2s s1 VERSION cmd id=0 " in line
               for line in lines), text
    assert any(line.startswith("     3 ") and " s2c s1 VERSION reply id=0 " in line
               for line in lines), text


def test_proxy_no_decode_v_says_why_it_prints_no_message_lines(tmp_path):
    listen = tmp_path / "p.sock"
    proxy = subprocess.Popen([*VFIOPROXY, "proxy", "--no-decode", "-v", "--listen", str(listen),
                              "--server", str(tmp_path / "none.sock")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(listen, proxy)
    finally:
        proxy.send_signal(signal.SIGINT)
        out, err = proxy.communicate(timeout=30)
    assert out == ""
    assert ("vfioproxy: --no-decode: nothing is decoded on the path, so -v prints no message "
            "lines") in err.splitlines()

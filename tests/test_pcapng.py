"""``vfioproxy trace export --format pcapng``: the layout of docs/pcapng.md, read
back by a pcapng reader of its own (below, written from the doc, not from the
writer) and by tshark, against what the trace and the other exports say."""

from __future__ import annotations

import json
import os
import pty
import shutil
import struct
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from recorder.records import EventRecord, FdKind, FdRecord, TraceHeader
from recorder.writer import TraceWriter
from tests.realdata import TRACES
from tests.test_cli_live import VFIOPROXY
from tests.test_proxy_inject import read_cmd
from tests.test_views import version_exchange
from vfioproxy.cli import main
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import build_command
from vfioproxy.protocol.codec import encode as encode_with_fds
from vfioproxy.protocol.header import Command, Header
from vfioproxy.side import Direction
from vfioproxy.trace.reading import open_trace
from vfioproxy.trace.show import jsonable

ALL = sorted(TRACES.glob("*.trace"))
BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"
GPIO = TRACES / "qemu-realize-gpio-001.trace"

# --- a pcapng reader, from docs/pcapng.md ----------------------------------------

SHB, IDB, EPB = 0x0A0D0D0A, 1, 6
PSEUDO = struct.Struct("<4sBBBBIQQQIBBHI")
TAGS = struct.pack(">HH", 12, 12) + b"vfio_user\0\0\0" + struct.pack(">HH", 0, 0)
#: the longest packet Wireshark reads for link type 252
MAX_PACKET = 262144
ALL_ONES = (1 << 64) - 1


def options(raw):
    found = []
    pos = 0
    while True:
        code, length = struct.unpack_from("<HH", raw, pos)
        if code == 0:
            assert length == 0 and pos + 4 == len(raw)
            return found
        found.append((code, raw[pos + 4:pos + 4 + length]))
        pos += 4 + length + (-length % 4)


def blocks(data):
    """(type, body) of each whole block of ``data``, and the bytes left over."""
    pos = 0
    found = []
    while len(data) - pos >= 12:
        kind, total = struct.unpack_from("<II", data, pos)
        if len(data) - pos < total:
            break
        assert total % 4 == 0 and struct.unpack_from("<I", data, pos + total - 4)[0] == total
        found.append((kind, data[pos + 8:pos + total - 4]))
        pos += total
    return found, data[pos:]


def tlvs(raw):
    found = []
    pos = 0
    while pos < len(raw):
        kind, length = struct.unpack_from("<HH", raw, pos)
        found.append((kind, raw[pos + 4:pos + 4 + length]))
        pos += 4 + length
    assert pos == len(raw)
    return found


class Capture:
    """A pcapng file read back: section options, interfaces, packets."""

    def __init__(self, data, *, whole=True):
        self.interfaces = []
        self.packets = []
        found, rest = blocks(data)
        assert not whole or rest == b""
        kind, body = found[0]
        assert kind == SHB
        magic, major, minor, length = struct.unpack_from("<IHHq", body)
        assert (magic, major, minor, length) == (0x1A2B3C4D, 1, 0, -1)
        self.section = options(body[16:])
        for kind, body in found[1:]:
            self.add(kind, body)

    def add(self, kind, body):
        if kind == IDB:
            link, reserved, snaplen = struct.unpack_from("<HHI", body)
            assert (link, reserved, snaplen) == (252, 0, 0)
            opts = dict(options(body[8:]))
            assert opts[9] == b"\x09"  # if_tsresol: ns
            self.interfaces.append((opts[2].decode(), opts.get(3, b"").decode()))
            return
        assert kind == EPB
        interface, high, low, captured, original = struct.unpack_from("<IIIII", body)
        data = body[20:20 + captured]
        assert body[20 + captured:] == b"\0" * (-captured % 4)  # no options
        assert data[:20] == TAGS
        fixed = PSEUDO.unpack_from(data, 20)
        magic, version, record, direction, flags, session, seq, t_ns, request_seq, wire, \
            layout, nfds, reserved, tlv_length = fixed
        assert (magic, version, reserved) == (b"VFUP", 1, 0)
        start = 20 + PSEUDO.size
        self.packets.append({
            "interface": self.interfaces[interface][0], "ts": (high << 32) | low,
            "captured": captured, "original": original, "record": record, "dir": direction,
            "flags": flags, "session": session, "seq": seq, "t_ns": t_ns,
            "request_seq": request_seq, "wire_length": wire, "dma_layout": layout,
            "nfds": nfds, "tlvs": tlvs(data[start:start + tlv_length]),
            "data": data[start + tlv_length:],
        })

    def comments(self):
        return [value.decode() for code, value in self.section if code == 1]


def tlv(packet, kind):
    return [value for k, value in packet["tlvs"] if k == kind]


def text(packet, kind):
    return [value.decode() for value in tlv(packet, kind)]


# --- helpers ---------------------------------------------------------------------


def encode(message):
    return encode_with_fds(message)[0]


def export(capsys, path, tmp_path, *extra):
    out = tmp_path / f"{path.stem}.pcapng"
    assert main(["trace", "export", "--format", "pcapng", "-o", str(out), "--force",
                 *map(str, extra), str(path)]) == 0
    assert capsys.readouterr().err == ""
    return Capture(out.read_bytes())


def jsonl(capsys, path, fmt="jsonl", *extra):
    assert main(["trace", "export", "--format", fmt, *map(str, extra), str(path)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def wall(header, t_ns):
    created = (header.created - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return created * 1000 + t_ns - header.mono_ns


def records(path):
    with open_trace(path) as reader:
        return reader.header, list(reader)


# --- the bundled traces ----------------------------------------------------------


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_record_is_a_packet_with_its_time_bytes_and_facts(capsys, tmp_path, path):
    header, trace = records(path)
    capture = export(capsys, path, tmp_path)
    assert capture.comments() == [
        f"vfioproxy trace format {header.version[0]}.{header.version[1]}",
        f"source: {header.source}", f"host: {header.host or '?'}",
        f"created: {header.created.isoformat()}",
        f"info: {json.dumps(jsonable(header.info), sort_keys=True)}"]
    assert dict(capture.section)[4].decode().endswith(" trace export")
    assert capture.interfaces[0] == ("trace", "")
    sessions = list(dict.fromkeys(r.session for r in trace if r.session is not None))
    assert [name for name, _ in capture.interfaces[1:]] == [f"session {s}" for s in sessions]
    assert len(capture.packets) == len(trace)
    for packet, record in zip(capture.packets, trace, strict=True):
        assert (packet["seq"], packet["session"], packet["t_ns"]) == (
            record.seq, record.session or 0, record.t_ns)
        assert packet["ts"] == wall(header, record.t_ns)
        assert packet["interface"] == (
            "trace" if record.session is None else f"session {record.session}")
        if isinstance(record, EventRecord):
            assert (packet["record"], packet["dir"], packet["wire_length"], packet["data"]) == (
                2, 255, 0, b"")
            assert text(packet, 5) == [record.kind]
            assert [json.loads(t) for t in text(packet, 6)] == [jsonable(record.data)]
            continue
        assert packet["record"] == (1 if record.torn else 0)
        assert packet["dir"] == ("c2s", "s2c").index(record.direction.value)
        assert (packet["wire_length"], packet["nfds"]) == (record.wire_length, len(record.fds))
        assert [(struct.unpack("<Q", v[:8])[0], v[8:].decode()) for v in tlv(packet, 4)] == [
            (ALL_ONES if fd.size is None else fd.size, fd.kind.value) for fd in record.fds]
        # the message bytes, cut at the packet limit; the original length counts them all
        fixed = 20 + PSEUDO.size + sum(4 + len(v) for _, v in packet["tlvs"])
        assert packet["data"] == record.data[:MAX_PACKET - fixed]
        assert packet["original"] == fixed + record.wire_length
        assert packet["flags"] & 4 == (4 if record.length is not None else 0)


def _messages(capture):
    return [p for p in capture.packets if p["record"] == 0]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_the_pseudo_header_says_what_the_jsonl_and_pairs_exports_say(capsys, tmp_path, path):
    capture = export(capsys, path, tmp_path)
    lines = jsonl(capsys, path)
    messages = [obj for obj in lines if obj["record"] == "message"]
    packets = _messages(capture)
    assert [(p["seq"], p["session"], ("c2s", "s2c")[p["dir"]]) for p in packets] == [
        (m["seq"], m["session"], m["dir"]) for m in messages]
    for packet, obj in zip(packets, messages, strict=True):
        latency = [struct.unpack("<Q", v)[0] for v in tlv(packet, 8)]
        assert latency == ([] if obj["latency_ns"] is None else [obj["latency_ns"]])
        register = obj["fields"]["register"]
        assert text(packet, 2) == ([] if register is None else [register])
        assert [t.split(": ", 1)[0] for t in text(packet, 1)] == [
            v["kind"] for v in obj["violations"]]
        assert bool(packet["flags"] & 1) == bool(obj["violations"])
    # request_seq: the reader's pairing, as the pairs export writes it
    answered = {p["reply"]["seq"]: p["request"]["seq"] for p in jsonl(capsys, path, "pairs")
                if p["reply"] is not None and p["request"] is not None}
    assert answered
    for packet in packets:
        paired = answered.get(packet["seq"])
        assert packet["request_seq"] == (paired or 0)
        assert bool(packet["flags"] & 8) == (paired is not None)
    # dma_layout: the sender's, from the client's VERSION on (the negotiated line says)
    negotiated = {obj["session"]: obj["dma_layout"] for obj in lines
                  if obj["record"] == "negotiated"}
    known = set()
    for packet, obj in zip(packets, messages, strict=True):
        if obj["dir"] == "c2s" and obj["command"] == "VERSION" and obj["type"] == "command":
            known.add(obj["session"])
        layouts = negotiated.get(obj["session"])
        if obj["session"] not in known or layouts is None:
            assert packet["dma_layout"] == 0
            continue
        sender = layouts["client" if obj["dir"] == "c2s" else "server"]
        assert packet["dma_layout"] == {"spec": 1, "qemu": 2}[sender]


def test_a_qemu_client_replies_in_the_qemu_dma_layout(capsys, tmp_path):
    packets = _messages(export(capsys, GPIO, tmp_path))
    assert {p["dma_layout"] for p in packets if p["dir"] == 0} == {2}
    assert {p["dma_layout"] for p in packets if p["dir"] == 1} == {1}
    told = _messages(export(capsys, GPIO, tmp_path, "--client-dma", "spec", "--server-dma",
                            "qemu"))
    assert [p["dma_layout"] for p in told] == [1 if p["dir"] == 0 else 2 for p in told]


def test_a_message_longer_than_a_packet_is_cut_and_says_so(capsys, tmp_path):
    capture = export(capsys, BOOT, tmp_path)
    cut = [p for p in capture.packets if p["captured"] < p["original"]]
    assert len(cut) == 1 and cut[0]["captured"] == MAX_PACKET
    assert cut[0]["wire_length"] > MAX_PACKET and not cut[0]["flags"] & 4


def test_filter_count_session_and_steps_pick_the_packets_as_for_jsonl(capsys, tmp_path):
    extra = ("-Y", "command == REGION_READ or command == REGION_WRITE", "-c", "7",
             "--session", "1")
    packets = export(capsys, GPIO, tmp_path, *extra).packets
    lines = jsonl(capsys, GPIO, "jsonl", *extra)
    assert [p["seq"] for p in packets] == [obj["seq"] for obj in lines] and len(packets) == 7
    steps = export(capsys, GPIO, tmp_path, "--steps").packets
    rows = jsonl(capsys, GPIO, "jsonl", "--steps")
    labels = {obj["seq"]: obj["fields"]["step"] for obj in rows if obj["record"] == "message"}
    assert all(labels.values())
    assert {p["seq"]: text(p, 3)[0] for p in steps if p["record"] == 0} == labels
    assert not any(tlv(p, 3) for p in export(capsys, GPIO, tmp_path).packets)


# --- what the bundled traces lack: violations, injections, cut, torn, fds --------


def test_violations_injections_cut_torn_messages_fds_and_events(capsys, tmp_path):
    trace = tmp_path / "t.trace"
    sent = read_cmd(1, offset=0xEF)
    big = encode(build_command(Command.REGION_WRITE, 2, RegionAccessBody(0, 7, 64, b"x" * 64)))
    inject = {"direction": "c2s", "index": 1,
              "applied": [{"rule": 1, "action": "corrupt", "text": "corrupt offset mask=0xff",
                           "value": 16}],
              "arrived": {"offset": 16, "length": 1, "data": b"\x10"}}
    fds = (FdRecord(0, FdKind.MEMFD, size=4096), FdRecord(1, FdKind.EVENTFD))
    header = TraceHeader.now("test", {"why": "pcapng"})
    with TraceWriter(trace, header) as writer:
        writer.write_event(1, "session_open", 0, {"client": "c", "server": "s", "wall": 1.0})
        version_exchange(writer)
        writer.append_message(1, Direction.C2S, 10, sent, (), events=[("inject", inject)])
        writer.append_message(1, Direction.S2C, 25, Header(1, Command.REGION_WRITE, 16, 1, 0)
                              .pack(), ())
        writer.append_message(1, Direction.C2S, 30, big[:40], (), length=len(big))
        writer.append_message(1, Direction.C2S, 40, read_cmd(3), fds)
        writer.write_event(None, "note", 45, {"text": "proxy-wide", "blob": b"\x01\x02"})
        writer.append_message(2, Direction.S2C, 50, read_cmd(4)[:20], (), torn=True)
    capture = export(capsys, trace, tmp_path)
    assert capture.interfaces == [("trace", ""), ("session 1", "vfio-user session 1: client=c "
                                                  "server=s"), ("session 2", "vfio-user session 2")]
    assert capture.comments()[-1] == 'info: {"why": "pcapng"}'
    by_seq = {p["seq"]: p for p in capture.packets}
    open_, version, reply, request, inject_event, wrong, cut, with_fds, note, torn = (
        by_seq[seq] for seq in sorted(by_seq))
    assert (open_["record"], text(open_, 5)) == (2, ["session_open"])
    assert (version["dma_layout"], reply["flags"], reply["request_seq"]) == (1, 8, version["seq"])
    # the injected request: its bytes as the receiver got them, the inject event's data
    assert request["flags"] & 2 and request["data"] == sent
    assert [json.loads(t) for t in text(request, 7)] == [jsonable(inject)]
    assert text(inject_event, 5) == ["inject"]
    # violations worded as trace show words them, after "!!!"
    assert main(["trace", "show", str(trace)]) == 0
    shown = [line.split("!!! ", 1)[1] for line in capsys.readouterr().out.splitlines()
             if "!!! " in line]
    written = [t.split(": ", 1) for p in capture.packets for t in text(p, 1)]
    assert [t for _, t in written] == shown and len(shown) >= 3
    assert wrong["flags"] & 1 and [k for k, _ in written][-1] == "torn_message"
    assert any("caused by the proxy's injection" in t for t in text(wrong, 1))
    # cut by the recorder: flag 2, original length counts the bytes it left out
    assert cut["flags"] & 4 and cut["data"] == big[:40] and cut["wire_length"] == len(big)
    assert cut["original"] - cut["captured"] == len(big) - 40
    assert [v[8:] for v in tlv(with_fds, 4)] == [b"memfd", b"eventfd"]
    assert [struct.unpack("<Q", v[:8])[0] for v in tlv(with_fds, 4)] == [4096, ALL_ONES]
    assert with_fds["nfds"] == 2
    assert (note["interface"], note["session"], note["dir"]) == ("trace", 0, 255)
    assert json.loads(text(note, 6)[0]) == {"text": "proxy-wide", "blob": "0102"}
    assert (torn["record"], torn["dir"], torn["flags"], torn["data"]) == (1, 1, 1, read_cmd(4)[:20])
    assert text(torn, 9) == ["torn: 20 bytes, then EOF"] and torn["interface"] == "session 2"


def test_a_text_too_long_for_its_16_bit_length_is_cut(capsys, tmp_path):
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, TraceHeader.now("test", {"long": "é" * 40000})) as writer:
        writer.write_event(1, "note", 0, {"text": "x" * 70000})
    capture = export(capsys, trace, tmp_path)
    data = text(capture.packets[0], 6)[0]
    assert len(data.encode()) <= 0xFFFF and data.endswith("...")
    assert data.startswith('{"text": "xxx')
    info = capture.comments()[-1]
    assert len(info.encode()) <= 0xFFFF and info.endswith("...")


# --- the command line -------------------------------------------------------------


def test_pcapng_goes_to_stdout_but_not_to_a_terminal(tmp_path):
    done = subprocess.run([*VFIOPROXY, "trace", "export", "--format", "pcapng", str(GPIO), "-"],
                          capture_output=True, check=False)
    assert done.returncode == 0 and done.stderr == b""
    assert len(Capture(done.stdout).packets) == len(records(GPIO)[1])
    master, slave = pty.openpty()
    try:
        refused = subprocess.run([*VFIOPROXY, "trace", "export", "--format", "pcapng",
                                  str(GPIO)], stdout=slave, stderr=subprocess.PIPE, check=False)
    finally:
        os.close(slave)
        os.close(master)
    assert refused.returncode == 2
    assert refused.stderr.decode().splitlines() == [
        "vfioproxy trace export: pcapng is binary: not writing it to a terminal (-o FILE, or "
        "pipe it: | wireshark -k -i -)"]


def test_outputs_are_claimed_and_one_output_is_named_once(capsys, tmp_path):
    out = tmp_path / "x.pcapng"
    out.write_bytes(b"")
    assert main(["trace", "export", "--format", "pcapng", "-o", str(out), str(GPIO)]) == 2
    assert "already exists (--force replaces it)" in capsys.readouterr().err
    assert main(["trace", "export", "--format", "pcapng", str(GPIO), str(out), "--force"]) == 0
    assert Capture(out.read_bytes()).packets
    assert main(["trace", "export", "-o", "a", str(GPIO), "b"]) == 2
    assert capsys.readouterr().err == "vfioproxy trace export: two outputs: -o a and b\n"
    assert main(["trace", "export", "--format", "parquet", "--follow", "-o", str(tmp_path / "p"),
                 str(GPIO)]) == 2
    assert "--follow" in capsys.readouterr().err


# --- tshark -----------------------------------------------------------------------


def tshark():
    found = shutil.which("tshark")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("tshark is not installed (apt-get install tshark): CI checks the "
                        "pcapng export with it")
        pytest.skip("tshark is not installed (apt-get install tshark)")
    return found


FIELDS = ("frame.number", "frame.time_epoch", "frame.interface_name", "frame.cap_len",
          "frame.len", "exported_pdu.prot_name")


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_tshark_reads_every_record_at_its_time_on_its_interface(capsys, tmp_path, path):
    program = tshark()
    header, trace = records(path)
    capture = export(capsys, path, tmp_path)
    done = subprocess.run(
        [program, "-r", str(tmp_path / f"{path.stem}.pcapng"), "-T", "fields",
         *(arg for field in FIELDS for arg in ("-e", field))],
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(rows) == len(trace) == len(capture.packets)
    for number, (row, record, packet) in enumerate(zip(rows, trace, capture.packets,
                                                       strict=True), 1):
        frame, epoch, interface, captured, length, dissector = row
        assert int(frame) == number
        assert int(Decimal(epoch) * 10**9) == wall(header, record.t_ns)
        assert interface == ("trace" if record.session is None else f"session {record.session}")
        assert (int(captured), int(length)) == (packet["captured"], packet["original"])
        assert dissector == "vfio_user"


def test_a_session_resumed_after_its_state_was_dropped_keeps_its_known_dma_layout(
        capsys, tmp_path):
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, TraceHeader.now("test", {})) as writer:
        version_exchange(writer)  # session 1: its layouts are known from here on
        writer.append_message(2, Direction.C2S, 1, read_cmd(1), ())  # drops session 1
        writer.append_message(1, Direction.C2S, 2, read_cmd(2), ())  # resumes it
    packets = export(capsys, trace, tmp_path, "--max-open-sessions", "1").packets
    assert [(p["session"], p["dma_layout"]) for p in packets] == [(1, 1), (1, 1), (2, 0), (1, 1)]

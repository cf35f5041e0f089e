"""The shipped Wireshark dissector (vfioproxy/wireshark/vfio_user.lua) agrees
with vfioproxy, field by field.

Every bundled trace, and two written here (violations, error replies, torn
and cut-short records, an injection; a QEMU client's DMA layout), is exported
with ``trace export --format pcapng`` and dissected by tshark with the Lua
dissector (``tshark -2``, so that requests link to their replies); each
message's fields are compared with what ``trace export --format jsonl`` says
of it, the frame links with ``--format pairs``, and expert info with the
violations and error replies. README's filters are run in both tools and
must pick the same messages. tshark is a system package: without it the
tshark tests skip with the reason, except under ``CI`` (``.ci/run`` installs
it), where a missing tshark fails. ``wireshark --path/--install`` are tested
without it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from recorder.records import FdKind, FdRecord, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.cli import main
from vfioproxy.protocol.constants import Feature, IrqIndex, MigrationState
from vfioproxy.protocol.header import HEADER_SIZE, Command, command_name
from vfioproxy.protocol.pci import Region, region_name
from vfioproxy.side import Direction
from vfioproxy.wireshark import DISSECTOR_NAME, dissector_path, install

ROOT = Path(__file__).resolve().parent.parent
TRACES = sorted((ROOT / "traces").glob("*.trace"))
LUA = dissector_path()
C2S, S2C = Direction.C2S, Direction.S2C

#: the fields read from tshark: the display filter's, then the links
FIELDS = ("frame.number", "vfio_user.pseudo.record", "vfio_user.seq", "vfio_user.session",
          "vfio_user.dir", "vfio_user.kind", "vfio_user.command", "vfio_user.msg_id",
          "vfio_user.size", "vfio_user.t", "vfio_user.latency", "vfio_user.time",
          "vfio_user.region", "vfio_user.offset", "vfio_user.count", "vfio_user.data",
          "vfio_user.errno", "vfio_user.fds", "vfio_user.fd.kind", "vfio_user.violation",
          "vfio_user.violation.text", "vfio_user.inject", "vfio_user.register",
          "vfio_user.step", "vfio_user.response_in", "vfio_user.response_to",
          "_ws.expert.message", "vfio_user.dma_layout")


def tshark() -> str:
    """tshark's path; skips (fails under CI) when there is none."""
    found = shutil.which("tshark")
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("tshark is missing under CI (.ci/run installs it: apt-get install tshark)")
        pytest.skip("tshark is not installed (apt-get install tshark); CI runs this test")
    return found


def export(trace: Path, out: Path, fmt: str, *options: str) -> Path:
    code = main(["trace", "export", "--format", fmt, "-o", str(out), *options, str(trace)])
    assert code == 0, f"trace export --format {fmt} {trace.name} exited {code}"
    return out


def dissect(pcapng: Path, *display_filter: str) -> list[dict[str, list[str]]]:
    """Each packet's :data:`FIELDS` as tshark's two-pass Lua dissection gives
    them (``display_filter``: ``-Y`` it), a list of values per field."""
    command = [tshark(), "-2", "-n", "-X", f"lua_script:{LUA}", "-r", str(pcapng), "-T", "json"]
    for name in FIELDS:
        command += ["-e", name]
    if display_filter:
        command += ["-Y", display_filter[0]]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "LC_ALL": "C"})
    assert done.returncode == 0, done.stderr
    assert "Lua" not in done.stderr, done.stderr
    packets = [packet["_source"]["layers"] for packet in json.loads(done.stdout or "[]")]
    for packet in packets:  # a Lua error in the dissector is an expert info of its own
        assert not any(e.startswith("Lua Error") for e in packet.get("_ws.expert.message", [])
                       ), packet
    return packets


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one(packet: dict[str, list[str]], name: str) -> str | None:
    values = packet.get(name)
    if values is None:
        return None
    assert len(values) == 1, (name, values)
    return values[0]


def number(text: str | None) -> int | None:
    return None if text is None else int(text, 0)


def errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value))


class Counts:
    """What a comparison covered."""

    def __init__(self) -> None:
        self.messages = 0
        self.fields = 0
        self.links = 0
        self.experts = 0

    def same(self, name: str, got: Any, want: Any, seq: int) -> None:
        assert got == want, f"#{seq} {name}: tshark {got!r}, vfioproxy {want!r}"
        self.fields += 1

    def __str__(self) -> str:
        return (f"{self.messages} messages, {self.fields} fields, {self.links} request/reply "
                f"links, {self.experts} expert infos compared")


def compare(trace: Path, tmp_path: Path) -> Counts:
    """Export ``trace`` both ways and compare every message (see the module's
    docstring); returns what was compared."""
    stem = tmp_path / trace.stem
    pcapng = export(trace, stem.with_suffix(".pcapng"), "pcapng", "--steps")
    records = jsonl(export(trace, stem.with_suffix(".jsonl"), "jsonl", "--steps"))
    pairs = jsonl(export(trace, stem.with_suffix(".pairs"), "pairs"))
    packets = dissect(pcapng)
    by_seq = {int(one(p, "vfio_user.seq") or -1): p for p in packets}
    written = [r for r in records if r["record"] in ("message", "event")]
    assert len(packets) == len(written) == len(by_seq)
    counts = Counts()
    for record in written:
        seq = record["seq"]
        packet = by_seq[seq]
        kind = {"event": "2", "message": "1" if record.get("torn") else "0"}[record["record"]]
        counts.same("pseudo.record", one(packet, "vfio_user.pseudo.record"), kind, seq)
        if "fields" not in record:
            continue
        compare_message(record, packet, counts)
    frames = {seq: int(one(p, "frame.number") or 0) for seq, p in by_seq.items()}
    answered = set()
    for pair in pairs:
        request, reply = pair["request"], pair["reply"]
        if request is not None and reply is not None:
            want_in, want_to = frames[reply["seq"]], frames[request["seq"]]
            assert number(one(by_seq[request["seq"]], "vfio_user.response_in")) == want_in
            assert number(one(by_seq[reply["seq"]], "vfio_user.response_to")) == want_to
            answered |= {request["seq"], reply["seq"]}
            counts.links += 1
    for seq, packet in by_seq.items():
        if seq not in answered:  # neither link on what pairs no other message
            assert "vfio_user.response_in" not in packet, seq
            assert "vfio_user.response_to" not in packet, seq
    return counts


def compare_message(record: dict[str, Any], packet: dict[str, list[str]], counts: Counts) -> None:
    """One message: every filter field but ``time`` (wall-clock, frame.time in
    Wireshark), and the expert infos."""
    fields = record["fields"]
    seq = record["seq"]
    same = counts.same
    counts.messages += 1
    for name in ("seq", "session", "msg_id", "size", "fds"):
        same(name, number(one(packet, f"vfio_user.{name}")), fields[name], seq)
    for name in ("dir", "kind", "register", "step"):
        same(name, one(packet, f"vfio_user.{name}"), fields[name], seq)
    same("command", command_name(int(one(packet, "vfio_user.command") or -1)),
         fields["command"], seq)
    region = number(one(packet, "vfio_user.region"))
    same("region", None if region is None else region_name(region), fields["region"], seq)
    same("offset", number(one(packet, "vfio_user.offset")), fields["offset"], seq)
    same("count", number(one(packet, "vfio_user.count")), fields["count"], seq)
    got_errno = number(one(packet, "vfio_user.errno"))
    same("errno", None if got_errno is None else errno_name(got_errno), fields["errno"], seq)
    same("fd.kind", packet.get("vfio_user.fd.kind", []), fields["fd.kind"], seq)
    same("violation", "vfio_user.violation" in packet, fields["violation"], seq)
    same("inject", "vfio_user.inject" in packet, fields["inject"], seq)
    data = one(packet, "vfio_user.data")
    want = fields["data"] or None  # b"": no field (`vfio_user.data` means some bytes)
    if data is not None:
        data = data.replace(":", "")
        if want is not None and len(data) < len(want):  # the export cut the packet
            want = want[:len(data)]
    same("data", data, want, seq)
    t = float(one(packet, "vfio_user.t") or "nan")
    assert abs(t - fields["t"]) <= 1e-9, (seq, t, fields["t"])
    counts.fields += 1
    latency = one(packet, "vfio_user.latency")
    if fields["latency"] is None:
        same("latency", latency, None, seq)
        same("time", one(packet, "vfio_user.time"), None, seq)
    else:
        assert latency is not None, seq
        assert abs(float(latency) - fields["latency"]) <= 1e-6 * max(1.0, fields["latency"]), seq
        response = float(one(packet, "vfio_user.time") or "nan")
        assert abs(response * 1e6 - fields["latency"]) <= 1e-3, seq
        counts.fields += 2
    experts = packet.get("_ws.expert.message", [])
    violations = [f"{v['kind']}: " for v in record["violations"]]
    texts = packet.get("vfio_user.violation.text", [])
    same("violations", [t[:len(v)] for t, v in zip(texts, violations, strict=False)],
         violations, seq)
    same("violation count", len(texts), len(violations), seq)
    error_reply = fields["errno"] is not None
    wanted = len(violations) + error_reply
    # a truncated record's cut-short note and a short body's malformed one come
    # with the violation that says so: expert info only where vfioproxy has some
    assert bool(experts) == bool(wanted), (seq, experts, record["violations"])
    assert len(experts) >= wanted, (seq, experts)
    if error_reply:
        assert any(fields["errno"] in e for e in experts), (seq, experts)
    counts.experts += len(experts)


@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_bundled_trace_fields(trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              record_property: Any) -> None:
    tshark()
    counts = compare(trace, tmp_path)
    assert counts.messages > 0 and counts.fields > 10 * counts.messages
    report(trace.name, counts, capsys, record_property)


# ------------------------------------------------------------------ written traces


def message(msg_id: int, command: int, body: bytes = b"", *, flags: int = 0, error: int = 0,
            size: int | None = None) -> bytes:
    length = HEADER_SIZE + len(body) if size is None else size
    return struct.pack("<HHIII", msg_id, command, length, flags, error) + body


REPLY, ERROR, NO_REPLY = 0x1, 0x21, 0x10
SPEC_VERSION = struct.pack("<HH", 0, 1) + b'{"capabilities":{"max_msg_fds":8}}\0'
QEMU_VERSION = struct.pack("<HH", 0, 0) + json.dumps({"capabilities": {
    "max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535,
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456}}}).encode() + b"\0"


def access(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return struct.pack("<QII", offset, region, count) + data


def write_hostile(path: Path) -> None:
    """A session full of what the expert info is for: violations (a reply to
    no request, a command sent the wrong way, a body too short, a reused id),
    error replies, an injected message, a truncated record, a torn message; and
    the less common bodies (region info with capabilities, io fds, SET_IRQS
    with bools, DMA_UNMAP with a bitmap, REGION_WRITE_MULTI, DEVICE_FEATURE,
    migration data) and a message longer than a pcapng packet may be."""
    memfd = FdRecord(0, FdKind.MEMFD, size=1 << 20)
    eventfd = FdRecord(0, FdKind.EVENTFD)
    sparse = struct.pack("<HHI", 1, 1, 0) + struct.pack("<II", 1, 0) + struct.pack(
        "<QQ", 0x1000, 0x1000)
    info = struct.pack("<IIIIQQ", 32 + len(sparse), 0xF, 0, 32, 0x4000, 0) + sparse
    iofd = struct.pack("<QQIIIIQQ", 0x10, 4, 0, 1, 0, 0, 0, 0xAB)
    big = bytes(range(256)) * 1200  # 307200 bytes: the export cuts it
    with TraceWriter(path, TraceHeader.now("test")) as w:
        t = iter(range(1000, 10**9, 1000))
        w.write_event(1, "session_open", next(t), {"client": "test", "server": "test"})
        messages = [
            (C2S, message(0, Command.VERSION, SPEC_VERSION), ()),
            (S2C, message(0, Command.VERSION, SPEC_VERSION, flags=REPLY), ()),
            (C2S, message(1, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 1 << 20)),
             (memfd,)),
            (S2C, message(1, Command.DMA_MAP, flags=REPLY), ()),
            (C2S, message(2, Command.DEVICE_GET_REGION_INFO,
                          struct.pack("<IIIIQQ", 64, 0, 0, 0, 0, 0)), ()),
            (S2C, message(2, Command.DEVICE_GET_REGION_INFO, info, flags=REPLY), ()),
            (C2S, message(3, Command.DEVICE_GET_REGION_IO_FDS,
                          struct.pack("<IIII", 64, 0, 0, 0)), ()),
            (S2C, message(3, Command.DEVICE_GET_REGION_IO_FDS,
                          struct.pack("<IIII", 64, 0, 0, 1) + iofd, flags=REPLY), ()),
            (C2S, message(4, Command.REGION_READ, access(Region.CONFIG, 4, 2)), ()),
            (S2C, message(4, Command.REGION_READ, flags=ERROR, error=errno.EINVAL), ()),
            (C2S, message(5, Command.DEVICE_SET_IRQS, struct.pack(
                "<IIIII", 22, 0x22, IrqIndex.MSIX, 0, 2) + b"\1\0"), ()),
            (S2C, message(5, Command.DEVICE_SET_IRQS, flags=REPLY), ()),
            (C2S, message(6, Command.DEVICE_SET_IRQS, struct.pack(
                "<IIIII", 20, 0x24, IrqIndex.INTX, 0, 1)), (eventfd,)),
            (S2C, message(6, Command.DEVICE_SET_IRQS, flags=REPLY), ()),
            (C2S, message(7, Command.DMA_UNMAP, struct.pack("<IIQQ", 48, 1, 0, 1 << 20)
                          + struct.pack("<QQ", 4096, 4)), ()),
            (S2C, message(7, Command.DMA_UNMAP, struct.pack("<IIQQ", 48, 1, 0, 1 << 20)
                          + struct.pack("<QQ", 4096, 4) + b"\xff\0\0\1", flags=REPLY), ()),
            (C2S, message(8, Command.REGION_WRITE_MULTI, struct.pack("<Q", 2)
                          + struct.pack("<QII8s", 0x10, 0, 4, b"\1\2\3\4")
                          + struct.pack("<QII8s", 0x14, 0, 4, b"\5\6\7\x08")), ()),
            (S2C, message(8, Command.REGION_WRITE_MULTI, struct.pack("<Q", 2), flags=REPLY), ()),
            (C2S, message(9, Command.DEVICE_FEATURE, struct.pack(
                "<III", 12, Feature.MIG_DEVICE_STATE | 0x20000, MigrationState.STOP_COPY)
                + struct.pack("<I", 0)), ()),
            (S2C, message(9, Command.DEVICE_FEATURE, struct.pack(
                "<II", 16, 0) + struct.pack("<II", MigrationState.STOP_COPY, 0)
                , flags=REPLY), (memfd,)),
            (C2S, message(10, Command.MIG_DATA_READ, struct.pack("<II", 16, 8)), ()),
            (S2C, message(10, Command.MIG_DATA_READ, struct.pack("<II", 16, 8) + b"migdata!",
                          flags=REPLY), ()),
            (C2S, message(11, Command.DEVICE_RESET, flags=NO_REPLY), ()),
            (S2C, message(11, Command.DEVICE_RESET, flags=ERROR, error=errno.EBUSY), ()),
            # violations
            (S2C, message(77, Command.REGION_WRITE, access(0, 0, 4, b"abcd"), flags=REPLY), ()),
            (C2S, message(12, Command.DMA_READ, struct.pack("<QQ", 0, 4)), ()),
            (C2S, message(13, Command.REGION_READ, struct.pack("<Q", 0)), ()),
            (C2S, message(14, Command.REGION_READ, access(Region.BAR0, 0, 4)), ()),
            (C2S, message(14, Command.REGION_READ, access(Region.BAR0, 4, 4)), ()),
            (C2S, message(15, 99, b"\0" * 8), ()),
            (C2S, message(16, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                          flags=0x7), ()),
            (C2S, message(17, Command.REGION_READ, access(Region.BAR2, 0, len(big))), ()),
            (S2C, message(17, Command.REGION_READ, access(Region.BAR2, 0, len(big), big),
                          flags=REPLY), ()),
        ]
        for direction, data, fds in messages:
            if data[2:4] == struct.pack("<H", Command.DMA_MAP) and direction is S2C:
                for _ in range(2000):  # a slow reply: 2 ms
                    next(t)
            w.write_message(1, direction, next(t), data, fds)
            if data[2:4] == struct.pack("<H", Command.MIG_DATA_READ) and direction is S2C:
                w.write_event(1, "inject", next(t), {
                    "direction": "s2c", "index": 12, "applied": [
                        {"rule": 1, "action": "delay", "text": "delay fixed(200us)",
                         "value": 0.0002}]})
        whole = message(18, Command.REGION_WRITE, access(Region.BAR0, 0, 64, bytes(64)))
        w.append_message(1, C2S, next(t), whole[:40], length=len(whole))
        w.append_message(1, S2C, next(t), message(18, Command.REGION_WRITE)[:10], torn=True)
        w.write_event(1, "session_close", next(t), {})


def write_qemu_dma(path: Path) -> None:
    """A QEMU client (its VERSION says so) and a spec server: the server's
    DMA_READ/DMA_WRITE commands in the spec's layout, the client's replies in
    QEMU's (count u32, data at 12), the DMA_WRITE reply 12 bytes long."""
    with TraceWriter(path, TraceHeader.now("test")) as w:
        t = iter(range(1000, 10**9, 1000))
        for direction, data in [
            (C2S, message(0, Command.VERSION, QEMU_VERSION)),
            (S2C, message(0, Command.VERSION, SPEC_VERSION, flags=REPLY)),
            (S2C, message(1, Command.DMA_READ, struct.pack("<QQ", 0x1000, 8))),
            (C2S, message(1, Command.DMA_READ, struct.pack("<QI", 0x1000, 8) + b"dmaread!"
                          + bytes(4), flags=REPLY)),
            (S2C, message(2, Command.DMA_WRITE, struct.pack("<QQ", 0x2000, 4) + b"\1\2\3\4")),
            (C2S, message(2, Command.DMA_WRITE, struct.pack("<QI", 0x2000, 4), flags=REPLY)),
            (S2C, message(3, Command.DMA_READ, struct.pack("<QQ", 0x3000, 16))),
            (C2S, message(3, Command.DMA_READ, flags=ERROR, error=errno.EFAULT)),
        ]:
            w.write_message(1, direction, next(t), data)


def report(name: str, counts: Counts, capsys: pytest.CaptureFixture[str],
           record_property: Any) -> None:
    """Say what a comparison covered (pytest's output and its junit XML)."""
    capsys.readouterr()
    record_property("compared", str(counts))
    with capsys.disabled():
        print(f"\n  {name}: {counts}")


def test_violations_and_expert_info(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    record_property: Any) -> None:
    tshark()
    trace = tmp_path / "hostile.trace"
    write_hostile(trace)
    counts = compare(trace, tmp_path)
    report("hostile (written)", counts, capsys, record_property)
    records = jsonl(tmp_path / "hostile.jsonl")
    violated = [r for r in records if r.get("violations")]
    assert len(violated) >= 8 and counts.experts >= len(violated)
    packets = {int(one(p, "vfio_user.seq") or 0): p for p in dissect(tmp_path / "hostile.pcapng")}
    torn = next(r for r in records if r.get("torn"))
    assert any("Torn" in e or "torn" in e for e in packets[torn["seq"]]["_ws.expert.message"])
    short = next(r for r in records if r["record"] == "message" and "fields" in r
                 and r["fields"]["msg_id"] == 13)
    assert any("too short" in e for e in packets[short["seq"]]["_ws.expert.message"])
    injected = [r for r in records if r.get("fields", {}).get("inject")]
    assert len(injected) == 1


def test_qemu_dma_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        record_property: Any) -> None:
    tshark()
    trace = tmp_path / "qemu-dma.trace"
    write_qemu_dma(trace)
    counts = compare(trace, tmp_path)
    report("qemu DMA layout (written)", counts, capsys, record_property)
    assert counts.messages == 8
    packets = dissect(tmp_path / "qemu-dma.pcapng",
                      'vfio_user.command == "DMA_READ" && vfio_user.kind == "reply"')
    assert [one(p, "vfio_user.dma_layout") for p in packets] == ["2"]
    assert bytes.fromhex(one(packets[0], "vfio_user.data") or "") == b"dmaread!"


# ------------------------------------------------------------------ README's filters

#: README's Wireshark filters and the same selection in `trace show -Y`
README_FILTERS = [
    ('vfio_user.command == "REGION_READ" && vfio_user.region == "CONFIG"',
     "command == REGION_READ and region == CONFIG"),
    ("vfio_user.errno", "kind == error"),
    ('vfio_user.errno == "EINVAL"', "errno == EINVAL"),
    ("vfio_user.time > 0.001", "latency > 1000"),
    ("vfio_user.latency > 100", "latency > 100"),
    ('vfio_user.register contains "MSI"', 'register contains "msi"'),
    ("vfio_user.violation", "violation"),
    ('vfio_user.dir == "s2c" && vfio_user.count >= 8', "dir == s2c and count >= 8"),
    ('vfio_user.fd.kind == "eventfd"', "fd.kind == eventfd"),
]


def show_seqs(trace: Path, expression: str, capsys: pytest.CaptureFixture[str]) -> list[int]:
    capsys.readouterr()
    assert main(["trace", "export", "--format", "jsonl", "-Y", expression, str(trace)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [r["seq"] for r in map(json.loads, lines) if "fields" in r]


def test_readme_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README's filters pick the same messages in tshark and in `trace show
    -Y`, each some messages of one of the traces at least."""
    tshark()
    readme = (ROOT / "README.md").read_text()
    hostile = tmp_path / "hostile.trace"
    write_hostile(hostile)
    matched = dict.fromkeys(README_FILTERS, 0)
    for trace in (ROOT / "traces/qemu-boot-qemu-server-nvme-001.trace",
                  ROOT / "traces/reference-realize-workload-msix-001.trace", hostile):
        pcapng = export(trace, tmp_path / f"{trace.stem}.pcapng", "pcapng")
        for wireshark, ours in README_FILTERS:
            assert f"`{wireshark}`" in readme, wireshark
            got = [int(one(p, "vfio_user.seq") or 0) for p in dissect(pcapng, wireshark)]
            assert got == show_seqs(trace, ours, capsys), (trace.name, wireshark, ours)
            matched[wireshark, ours] += len(got)
        # expert info: on the violations and error replies, and the torn
        # messages (records, not messages, to trace show -Y)
        experts = [int(one(p, "vfio_user.seq") or 0) for p in dissect(pcapng, "_ws.expert")]
        torn = [r["seq"] for r in jsonl(export(trace, tmp_path / f"{trace.stem}.jsonl", "jsonl"))
                if r.get("torn")]
        assert experts == sorted(show_seqs(trace, "violation or kind == error", capsys) + torn)
    assert "`_ws.expert`" in readme and experts
    assert all(matched.values()), matched


# ------------------------------------------------------------------ names


def lua_table(name: str) -> dict[int, str]:
    """The Lua table ``local NAME = { [1] = "X", ... }`` of the dissector."""
    text = LUA.read_text()
    block = re.search(rf"local {name} = \{{(.*?)\}}", text, re.DOTALL)
    assert block is not None, name
    return {int(k): v for k, v in re.findall(r'\[(\d+)\] = "([^"]*)"', block.group(1))}


def test_lua_names_are_vfioproxy_names() -> None:
    """The dissector's name tables say what vfioproxy's enums say."""
    assert lua_table("COMMANDS") == {n: command_name(n) for n in range(1, 19)}
    assert lua_table("REGIONS") == {int(r): r.name for r in Region}
    assert lua_table("IRQ_INDEXES") == {int(i): i.name for i in IrqIndex}
    assert lua_table("FEATURES") == {int(f): f.name for f in Feature}
    assert lua_table("MIGRATION_STATES") == {int(s): s.name for s in MigrationState}
    assert lua_table("ERRNOS") == dict(errno.errorcode)


# ------------------------------------------------------------------ the command


def test_wireshark_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wireshark", "--path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == LUA and path.name == DISSECTOR_NAME
    assert 'Proto("vfio_user", "vfio-user")' in path.read_text()


def test_wireshark_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "plugins" / "deeper"
    assert main(["wireshark", "--install", "--dest", str(dest)]) == 0
    target = dest / DISSECTOR_NAME
    assert capsys.readouterr().out == f"installed {target}\n"
    assert target.read_bytes() == LUA.read_bytes()
    assert main(["wireshark", "--install", "--dest", str(dest)]) == 0  # the same: fine
    capsys.readouterr()
    target.write_text("-- someone's own edit\n")
    assert main(["wireshark", "--install", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vfioproxy wireshark: ") and "--force" in err and len(
        err.splitlines()) == 1
    assert target.read_text() == "-- someone's own edit\n"
    assert main(["wireshark", "--install", "--dest", str(dest), "--force"]) == 0
    assert target.read_bytes() == LUA.read_bytes()
    assert [p.name for p in dest.iterdir()] == [DISSECTOR_NAME]  # no temporary left


def test_wireshark_install_default_folder(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --dest: the folder tshark names (a stand-in tshark on PATH
    here), else ~/.local/lib/wireshark/plugins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "tshark"
    fake.write_text(f"#!/bin/sh\nprintf 'Personal configuration:\\t/x\\n"
                    f"Personal Lua Plugins:\\t{tmp_path}/lua\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert install() == tmp_path / "lua" / DISSECTOR_NAME
    fake.unlink()
    assert install() == tmp_path / "home" / ".local/lib/wireshark/plugins" / DISSECTOR_NAME


def test_wireshark_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wireshark", "--path", "--force"]) == 2
    assert "--install" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["wireshark"])

"""The pieces of a replay: ignore rules, field diffs, reports, fresh fds, guest memory."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest

from recorder.records import FdRecord
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from vfioproxy.io.fds import FdKind, close_all, inspect_fd, make_memfd
from vfioproxy.protocol.bodies import (
    DmaAccessBody,
    DmaLayout,
    DmaMapBody,
    DmaUnmapBody,
    RegionAccessBody,
)
from vfioproxy.protocol.codec import build_command, build_reply
from vfioproxy.protocol.header import Command
from vfioproxy.replay.fdrebuild import FdRebuilder
from vfioproxy.replay.fields import FdFacts, PciContext, field_names, flatten
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule, Matcher, RuleError, compare
from vfioproxy.replay.memory import ReplayMemory
from vfioproxy.replay.report import Divergence, FieldDiff, Nearest, ReplayReport
from vfioproxy.replay.script import load_script
from vfioproxy.side import Direction

pytestmark = FD_HYGIENE

E1000E = load_script(TRACES / "qemu-realize-qemu-server-e1000e-001.trace")


def read_reply(offset: int, data: bytes, region: int = 7):
    request = build_command(Command.REGION_READ, 9, RegionAccessBody(offset, region, len(data)))
    return build_reply(request, RegionAccessBody(offset, region, len(data), data))


def diffs_of(live, recorded, rules=DEFAULT_IGNORES, pci=E1000E.pci):
    return [d.text() for d in compare(flatten(live), flatten(recorded),
                                      label="REGION_READ reply", message=recorded, pci=pci,
                                      rules=rules)]


@pytest.mark.parametrize(
    ("text", "command", "field"),
    [
        ("header.msg_id", "*", "header.msg_id"),
        ("VERSION:header.size", "VERSION", "header.size"),
        ("REGION_READ reply:data[0x140:0x148]", "REGION_READ reply", "data[0x140:0x148]"),
        ("data[0x2:0x4]", "*", "data[0x2:0x4]"),
    ],
)
def test_ignore_rules_parse_as_command_and_field(text, command, field):
    assert IgnoreRule.parse(text) == IgnoreRule(command, field)


@pytest.mark.parametrize("text", ["", ":data", "REGION_READ:"])
def test_a_malformed_ignore_rule_is_refused(text):
    with pytest.raises(ValueError, match="expected \\[COMMAND:\\]FIELD"):
        IgnoreRule.parse(text)


@pytest.mark.parametrize(
    ("rule", "label", "field", "ignored"),
    [
        ("header.msg_id", "DMA_MAP cmd", "header.msg_id", True),
        ("VERSION:json", "VERSION reply", "json.capabilities.max_msg_fds", True),
        ("VERSION:json", "DMA_MAP reply", "json.capabilities.max_msg_fds", False),
        ("REGION_READ reply:data", "REGION_READ reply", "data[0x2:0x4]", True),
        ("REGION_READ reply:data", "REGION_READ cmd", "data[0x2:0x4]", False),
        ("*:data[0x140:0x148]", "REGION_READ reply", "data[0x144:0x148]", True),
        ("*:data[0x140:0x148]", "REGION_READ reply", "data[0x146:0x14a]", False),
        ("caps", "DEVICE_GET_REGION_INFO reply", "len(caps)", True),
        ("fds", "DMA_MAP cmd", "fds[0].kind", True),
        ("REGION_*:offset", "REGION_WRITE cmd", "offset", True),
    ],
)
def test_a_rule_covers_its_field_its_sub_fields_and_byte_ranges_inside_it(
    rule, label, field, ignored
):
    assert IgnoreRule.parse(rule).applies(label, field) is ignored


def test_a_short_config_read_differs_as_one_number():
    assert diffs_of(read_reply(0x10, bytes.fromhex("0000 00fe")),
                    read_reply(0x10, bytes.fromhex("0000 00fd"))) == [
        "data 0xfe000000 != recorded 0xfd000000"
    ]


def test_a_config_space_copy_differs_register_by_register_named_from_its_capabilities():
    recorded = bytes(E1000E.pci.config)
    live = bytearray(recorded)
    live[0x02:0x04] = (0x10D4).to_bytes(2, "little")
    live[0xA2] = 0x07
    live[0x41:0x43] = b"\xff\xff"
    assert diffs_of(read_reply(0, bytes(live)), read_reply(0, recorded)) == [
        "data[0x2:0x4] (device_id) 0x10d4 != recorded 0x10d3",
        "data[0x41:0x43] (device-specific) 0xffff != recorded 0x0000",
        "data[0xa2:0xa4] (MSI-X[0xa0].msg_ctl) 0x0007 != recorded 0x0004",
    ]


def test_other_data_differs_by_byte_ranges_with_the_rest_summed_up():
    recorded = bytes(4096)
    live = bytes(0xFF if i % 512 == 0 else 0 for i in range(4096))
    texts = diffs_of(read_reply(0x1000, live, region=2), read_reply(0x1000, recorded, region=2))
    assert texts[0] == "data[0x1000:0x1001] ff != recorded 00"
    assert texts[1] == "data[0x1200:0x1201] ff != recorded 00"
    assert len(texts) == 8


def test_an_ignored_byte_range_hides_only_what_lies_inside_it():
    recorded = bytes(E1000E.pci.config)
    live = bytearray(recorded)
    live[0x144] ^= 1
    live[0x02] ^= 1
    rules = (*DEFAULT_IGNORES, IgnoreRule.parse("data[0x140:0x14c]"))
    assert diffs_of(read_reply(0, bytes(live)), read_reply(0, recorded), rules) == [
        "data[0x2:0x4] (device_id) 0x10d2 != recorded 0x10d3"
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("REGION_RAED:data[0x2:0x4]", "unknown command 'REGION_RAED' (did you mean REGION_READ?)"),
        ("region_read:data", "unknown command 'region_read' (did you mean REGION_READ?)"),
        ("DMA_*X:data", "no command matches 'DMA_*X'"),
        ("REGION_READ:dtaa", "unknown field 'dtaa' (did you mean data?); fields here: count, "
                             "data, fds, header, offset, payload, reason, region"),
        ("REGION_READ:caps", "unknown field 'caps'"),
        ("header.msgid", "unknown field 'msgid' in 'header.msgid' (did you mean msg_id?)"),
        ("fds[0].knd", "unknown field 'knd' in 'fds[0].knd' (did you mean kind?)"),
        ("DEVICE_GET_REGION_INFO reply:caps[0].areaz", "(did you mean areas?)"),
        ("data[0x2", "malformed field 'data[0x2' at 'data[0x2': expected NAME, NAME[INDEX] or "
                     "NAME[START:END]"),
        ("data[0x4:0x2]", "empty byte range in 'data[0x4:0x2]'"),
        ("data[0x2:]", "malformed field"),
    ],
)
def test_an_ignore_rule_naming_nothing_is_refused_with_the_nearest_valid_name(text, says):
    with pytest.raises(RuleError) as refused:
        IgnoreRule.parse(text)
    assert str(refused.value).startswith(f"bad ignore rule {text!r}: ")
    assert says in str(refused.value)


@pytest.mark.parametrize(
    "text",
    ["json.capabilities.migration", "VERSION reply:json.anything", "caps[0].areas[1].offset",
     "DEVICE_GET_REGION_INFO:len(caps)", "fds[0].sha256", "DMA_WRITE cmd:data", "REGION_*:off*",
     "*:data[0x140:0x148]", "DEVICE_FEATURE:feature_data.device_state"],
)
def test_every_field_flatten_can_produce_is_accepted(text):
    IgnoreRule.parse(text)


def test_field_names_are_those_flatten_produces_for_the_command():
    names = set()
    for step in E1000E.steps:
        if step.message.command == Command.DEVICE_GET_REGION_INFO:
            for key in flatten(step.message):
                names.update(part.split("[")[0].removeprefix("len(").rstrip(")")
                             for part in key.split(".") if not key.startswith("header."))
    assert names and names <= field_names(Command.DEVICE_GET_REGION_INFO) | {"fds"}


@pytest.mark.parametrize(
    ("text", "says"),
    [("comand", "bad match key 'comand': unknown field 'comand' (did you mean command?)"),
     ("command,ofset", "bad match key 'ofset': unknown field 'ofset' (did you mean offset?)"),
     ("offset,data[0x2", "bad match key 'data[0x2': malformed field"),
     (" , ", "a matcher needs at least one key")],
)
def test_a_matcher_key_naming_nothing_is_refused_with_the_nearest_valid_name(text, says):
    with pytest.raises(RuleError, match=re.escape(says)):
        Matcher.parse(text)


def test_a_matcher_looks_only_at_its_keys():
    matcher = Matcher.parse("command,offset,region")
    assert matcher.selects("header.command") and matcher.selects("header.flags")
    assert matcher.selects("offset") and not matcher.selects("count")
    assert not matcher.selects("fds[0].kind") and Matcher().selects("fds[0].kind")
    assert Matcher().selects("data[0x0:0x4]") and not Matcher().selects("header.size")


def test_version_replies_compare_by_parsed_json_not_by_key_order_or_spacing():
    versions = [s.message for s in E1000E.steps[:2]]
    flat = flatten(versions[1])
    assert flat["json.capabilities.max_msg_fds"] == 8 and "json_text" not in flat


def test_fds_compare_by_count_kind_and_size():
    message = E1000E.steps[2].message  # DMA_MAP with guest RAM
    live = flatten(message, [FdFacts("file", 4096)])
    recorded = flatten(message, [FdFacts("memfd", 0x20000000)])
    assert [d.text() for d in compare(live, recorded, label="DMA_MAP cmd", message=message,
                                      pci=PciContext())] == [
        "fds[0].kind file != recorded memfd",
        "fds[0].size 0x1000 != recorded 0x20000000",
    ]


def test_a_report_highlights_the_first_divergence_and_lists_all_as_text_and_json():
    first = Divergence("mismatch", "REGION_READ reply", 17, "config space offset 0x10 BAR0",
                       (FieldDiff("data", "0xfe000000", "0xfd000000"),))
    second = Divergence("unmatched", "live REGION_READ cmd #40", None, None,
                        detail="no recorded request matches it",
                        nearest=(Nearest(44, "REGION_READ cmd",
                                         (FieldDiff("offset", 0x44, 0x40),)),))
    report = ReplayReport(mode="client", trace="t.trace", session=1, peer="/tmp/s", recorded=4,
                          replayed=4, sent=2, received=2, compared=2, matched=1, elapsed=0.5,
                          divergences=(first, second))
    assert report.text().splitlines() == [
        "replay client of t.trace session 1 against /tmp/s",
        "FIRST DIVERGENCE: message #17 REGION_READ reply (config space offset 0x10 BAR0): "
        "data 0xfe000000 != recorded 0xfd000000",
        "divergences (2):",
        "  message #17 REGION_READ reply (config space offset 0x10 BAR0): "
        "data 0xfe000000 != recorded 0xfd000000",
        "  live REGION_READ cmd #40: no recorded request matches it",
        "    nearest recorded requests:",
        "      #44 REGION_READ cmd: offset 0x44 != recorded 0x40",
        "summary: 4 of 4 recorded messages replayed (2 sent, 2 received); 2 compared: "
        "1 matched, 1 diverged; 2 divergence(s); 0.500 s",
    ]
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and data["diverged"] == 1
    assert data["divergences"][0] == {
        "kind": "mismatch", "seq": 17, "message": "REGION_READ reply",
        "where": "config space offset 0x10 BAR0",
        "diffs": [{"field": "data", "live": "0xfe000000", "recorded": "0xfd000000"}],
        "text": "message #17 REGION_READ reply (config space offset 0x10 BAR0): "
                "data 0xfe000000 != recorded 0xfd000000",
    }
    assert data["divergences"][1]["nearest"][0]["seq"] == 44


def test_error_numbers_are_named_in_reports():
    assert FieldDiff("header.error", 22, 0).text() == "header.error 22 (EINVAL) != recorded 0"


def test_fresh_fds_have_the_recorded_kind_size_and_contents():
    rebuilder = FdRebuilder()
    try:
        contents = b"region" + bytes(4090)
        memfd = FdRecord(0, FdKind.MEMFD, size=4096, contents=contents)
        file = FdRecord(0, FdKind.FILE, size=16384)
        event = FdRecord(0, FdKind.EVENTFD)
        sock = FdRecord(0, FdKind.SOCKET)
        fds = rebuilder.fresh(Direction.S2C, [memfd, file, event, sock])
        try:
            kinds = [(inspect_fd(fd).kind, inspect_fd(fd).size) for fd in fds]
            assert kinds == [(FdKind.MEMFD, 4096), (FdKind.FILE, 16384),
                             (FdKind.EVENTFD, None), (FdKind.SOCKET, None)]
            assert os.pread(fds[0].fileno(), 6, 0) == b"region"
        finally:
            close_all(fds)
    finally:
        rebuilder.close()


def test_one_fresh_fd_stands_for_one_recorded_object():
    rebuilder = FdRebuilder()
    try:
        ram = FdRecord(0, FdKind.MEMFD, size=1 << 20, inode=7)
        other = FdRecord(0, FdKind.MEMFD, size=1 << 20, inode=8)
        no_inode = FdRecord(0, FdKind.MEMFD, size=1 << 20)
        event = FdRecord(0, FdKind.EVENTFD)
        c2s = Direction.C2S
        assert rebuilder.original(c2s, ram) is rebuilder.original(c2s, ram)
        assert rebuilder.original(c2s, ram) is not rebuilder.original(c2s, other)
        assert rebuilder.original(c2s, no_inode) is rebuilder.original(c2s, no_inode)
        assert rebuilder.original(c2s, event) is not rebuilder.original(c2s, event)
    finally:
        rebuilder.close()


def dma(command: int, address: int, count: int, data: bytes = b""):
    return build_command(command, 5, DmaAccessBody(address, count, data))


def test_guest_memory_answers_dma_from_the_windows_the_replay_mapped():
    memory = ReplayMemory()
    ram = make_memfd("ram", 0x10000)
    try:
        memory.map(DmaMapBody(32, 0x3, 0, 0x100000, 0x10000), ram)
        memory.map(DmaMapBody(32, 0x1, 0, 0xF0000, 0x1000), None)
        write = memory.answer(dma(Command.DMA_WRITE, 0x100010, 4, b"abcd"),
                              layout=DmaLayout.QEMU, max_data_xfer_size=1 << 20)
        assert write is not None and write.header.size == 16  # QEMU: header only
        assert os.pread(ram.fileno(), 4, 0x10) == b"abcd"  # the server sees it in the memfd
        read = memory.answer(dma(Command.DMA_READ, 0x100010, 4), layout=DmaLayout.QEMU,
                             max_data_xfer_size=1 << 20)
        assert read is not None and read.body == DmaAccessBody(0x100010, 4, b"abcd",
                                                               bytes(4), DmaLayout.QEMU)
        spec = memory.answer(dma(Command.DMA_READ, 0x100010, 4), layout=DmaLayout.SPEC,
                             max_data_xfer_size=1 << 20)
        assert spec is not None and spec.body == DmaAccessBody(0x100010, 4, b"abcd")
        refused = [
            memory.answer(dma(Command.DMA_READ, 0x5000, 4), layout=DmaLayout.QEMU,
                          max_data_xfer_size=1 << 20),
            memory.answer(dma(Command.DMA_WRITE, 0xF0000, 1, b"x"), layout=DmaLayout.QEMU,
                          max_data_xfer_size=1 << 20),
            memory.answer(dma(Command.DMA_READ, 0x100000, 64), layout=DmaLayout.QEMU,
                          max_data_xfer_size=32),
        ]
        assert [r.header.error for r in refused if r is not None] == [
            errno.EFAULT, errno.EPERM, errno.E2BIG]
        assert memory.knows(0x100010, 4) and not memory.knows(0x100000, 0x20)
        memory.unmap(DmaUnmapBody(24, 0, 0x100000, 0x10000))
        assert not memory.knows(0x100010, 4)
        gone = memory.answer(dma(Command.DMA_READ, 0x100010, 4), layout=DmaLayout.QEMU,
                             max_data_xfer_size=1 << 20)
        assert gone is not None and gone.header.error == errno.EFAULT
    finally:
        memory.close()
        ram.close()

"""The display filter language (vfioproxy/trace/filter.py) and trace show/stats -Y/-c."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.errors import UsageError
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import Region
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.filter import FIELDS, compile_filter, select
from vfioproxy.trace.timeline.labels import label_messages

BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"
README = Path(__file__).resolve().parent.parent / "README.md"


def messages(path=BOOT):
    with TraceReader(path) as reader:
        return [i for i in decoded_records(reader) if isinstance(i, DecodedMessage)]


MESSAGES = messages()


def matching(expr, items=MESSAGES):
    return [m.record.seq for m in select(items, compile_filter(expr))]


def body(m):
    return m.observation.message.body


def region_access(m, region):
    return m.observation.message.command in (Command.REGION_READ, Command.REGION_WRITE) \
        and body(m).region == region


# --------------------------------------------------------------- real trace, counted by hand


def test_rom_reads_are_the_request_and_reply_of_the_one_rom_read():
    want = [m.record.seq for m in MESSAGES
            if m.observation.message.command == Command.REGION_READ
            and region_access(m, Region.ROM)]
    assert len(want) == 2
    assert matching("command == REGION_READ and region == ROM") == want
    assert matching("command == 9 and region == 6") == want
    assert matching("command == 0x9 and region == rom") == want


def test_client_commands_are_counted_by_direction_and_kind():
    want = [m.record.seq for m in MESSAGES
            if m.record.direction is Direction.C2S and not m.observation.message.is_reply]
    assert len(want) == 136
    assert matching("dir == c2s and kind == cmd") == want
    assert matching("not (dir == s2c or kind != cmd)") == want


def test_register_names_the_config_space_command_register_case_insensitively():
    want = [m.record.seq for m in MESSAGES
            if region_access(m, Region.CONFIG) and body(m).offset == 4 and body(m).count == 2]
    assert len(want) == 12
    assert matching('register == "COMMAND"') == want
    assert matching("register == command") == want
    assert matching('register == "command" and offset == 0x4') == want


def test_register_names_capability_fields_as_the_sessions_config_space_does():
    # e1000e: MSI-X at 0xa0 (msg_ctl, table, pba read), MSI at 0xd0 (msg_ctl read)
    want = [m.record.seq for m in MESSAGES if region_access(m, Region.CONFIG)
            and (0xa0 <= body(m).offset < 0xac or 0xd0 <= body(m).offset < 0xd4)]
    assert len(want) == 8
    assert matching('register matches "^MSI"') == want
    assert matching('register contains "msg_ctl"') == [want[0], want[1], want[6], want[7]]
    assert matching('register == "MSI-X[0xa0].pba"') == want[4:6]
    # each matches what trace show prints for it
    shown = {m.record.seq: m.text for m in MESSAGES}
    assert all("MSI" in shown[seq] for seq in want)


def test_step_uses_the_timelines_labels():
    labels = {m.record.seq: label.text() for m, label in label_messages(MESSAGES)}
    want = [seq for seq, text in sorted(labels.items()) if text.startswith("S")]
    assert len(want) == 36
    assert matching('step matches "^S"') == want
    assert matching("step == R1") == [s for s, t in sorted(labels.items()) if t == "R1"]


def test_data_slices_compare_with_hex_bytes_in_written_order():
    want = [m.record.seq for m in MESSAGES
            if isinstance(getattr(body(m), "data", None), bytes)
            and body(m).data[:2] == b"\x55\xaa"]
    assert len(want) == 1
    assert matching("data[0:2] == 0x55aa") == want
    assert matching("data[0:2] == 0xaa55") == []
    assert matching("region == ROM and data contains 0x55aa93e9") == want


def test_fields_a_message_lacks_make_comparisons_false():
    assert matching("command == VERSION") == matching("command == VERSION and not (offset > 0)")
    assert matching("command == VERSION and offset >= 0") == []
    assert matching("errno == EINVAL") == [
        m.record.seq for m in MESSAGES
        if m.observation.message.is_error and m.observation.message.header.error == 22]


def test_in_sets_and_matches_on_command_names():
    dma = [m.record.seq for m in MESSAGES
           if m.observation.message.command in (Command.DMA_MAP, Command.DMA_UNMAP)]
    assert dma
    assert matching("command in {DMA_MAP, DMA_UNMAP}") == dma
    assert matching('command matches "^DMA_(UN)?MAP$"') == dma
    assert matching("command in {DMA_MAP, 0x3}") == dma


def test_fds_and_fd_kinds_and_latency():
    with_fds = [m.record.seq for m in MESSAGES if m.record.fds]
    assert matching("fds > 0") == with_fds
    eventfds = [m.record.seq for m in MESSAGES
                if any(fd.kind.value == "eventfd" for fd in m.record.fds)]
    assert eventfds
    assert matching("fd.kind == eventfd") == eventfds
    slow = [m.record.seq for m in MESSAGES
            if m.latency_ns is not None and m.latency_ns > 100_000]
    assert matching("latency > 100") == slow


def test_time_is_the_wall_clock_from_the_trace_header():
    with TraceReader(BOOT) as reader:
        header = reader.header
    middle = MESSAGES[len(MESSAGES) // 2]
    when = header.wall_time(middle.record.t_ns)
    want = [m.record.seq for m in MESSAGES if header.wall_time(m.record.t_ns) >= when]
    assert 0 < len(want) < len(MESSAGES)
    flt = compile_filter(f'time >= "{when.isoformat()}"')
    assert [m.record.seq for m in select(MESSAGES, flt, header=header)] == want
    naive = compile_filter(f'time >= "{when.replace(tzinfo=None).isoformat()}"')
    assert [m.record.seq for m in select(MESSAGES, naive, header=header)] == want
    assert list(select(MESSAGES, flt)) == []


def test_t_counts_seconds_from_the_sessions_first_message():
    start = MESSAGES[0].record.t_ns
    want = [m.record.seq for m in MESSAGES if m.record.t_ns - start < 50_000_000]
    assert 0 < len(want) < len(MESSAGES)
    assert matching("t < 0.05") == want


def test_count_stops_after_n_matches_and_keeps_order():
    assert [m.record.seq for m in select(MESSAGES, compile_filter("kind == reply"), 3)] \
        == matching("kind == reply")[:3]


# --------------------------------------------------------------- parser


def test_and_binds_tighter_than_or_and_parentheses_override():
    loose = set(matching("command == VERSION or dir == c2s and kind == reply"))
    assert loose == set(matching("command == VERSION"))
    tight = set(matching("(command == VERSION or dir == c2s) and kind == reply"))
    assert tight == set(matching("command == VERSION and kind == reply"))


def test_not_applies_to_the_next_term_only():
    assert set(matching("not dir == c2s and kind == reply")) == set(matching("kind == reply"))


def test_numbers_in_hex_and_decimal_agree():
    assert matching("seq >= 0x10 and seq < 0x20") == matching("seq >= 16 and seq < 32")
    assert len(matching("seq >= 16 and seq < 32")) == 16


@pytest.mark.parametrize(("expr", "error"), [
    ("regoin == ROM", 'unknown field "regoin" at 0; did you mean "region"?'),
    ("dir == c2s and comand == 1", 'unknown field "comand" at 15; did you mean "command"?'),
    ("region == BAR9", 'unknown region name "BAR9" at 10'),
    ("errno == ENOPE", 'unknown errno name "ENOPE" at 9'),
    ("command == 3 and", "expected a field name, got end of expression at 16"),
    ("(seq == 1", 'expected ")", got end of expression at 9'),
    ("seq = 1", 'unexpected "=" at 4'),
    ("dir == C2S", 'dir is one of c2s, s2c, not "C2S" at 7'),
    ("fd.kind == memfds",
     'fd.kind is one of memfd, eventfd, socket, file, other, not "memfds" at 11'),
    ("seq == 1 seq", 'unexpected "seq" at 9'),
    ("seq < c2s", 'seq compares with a number, not "c2s" at 6'),
    ("dir < c2s", 'dir takes == != in contains matches, not "<" at 4'),
    ("seq[0:2] == 1", 'field seq cannot be sliced: "[" at 3'),
    ('command matches "("', 'bad regex "(" at 16'),
    ('time > "yesterday"',
     'time takes an ISO 8601 time (2026-11-25T09:22:57.2), not "yesterday" at 7'),
    ('region == "BAR9"', 'unknown region name "BAR9" at 10'),
    ("seq", 'expected an operator after seq, got end of expression at 3'),
])
def test_bad_expressions_name_position_and_token(expr, error):
    with pytest.raises(UsageError) as raised:
        compile_filter(expr)
    assert str(raised.value).startswith(f"filter: {error}")


def test_step_is_labelled_only_when_the_expression_uses_it():
    assert "step" in compile_filter("step == R1 or seq == 1").fields
    assert "step" not in compile_filter("seq == 1").fields


# --------------------------------------------------------------- README and CLI


def test_readme_field_table_lists_exactly_the_filter_fields():
    section = README.read_text().split("### Display filters\n", 1)[1].split("\n### ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)
    assert listed == [f.name for f in FIELDS]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_trace_show_y_prints_only_matching_messages(capsys):
    code, out, _ = run(capsys, "trace", "show", "-Y", "region == ROM", BOOT)
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert code == 0
    assert len(lines) == 2 and all(" ROM RD262144 @0x0" in line for line in lines)


def test_trace_show_c_stops_after_n_messages(capsys):
    code, out, _ = run(capsys, "trace", "show", "-c", "4", "-Y", "kind == cmd", BOOT)
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert code == 0
    assert [int(line.split()[0]) for line in lines] == matching("kind == cmd")[:4]


def test_trace_stats_y_counts_only_matching_messages(capsys):
    code, out, _ = run(capsys, "trace", "stats", "-Y", "dir == c2s and kind == cmd", BOOT)
    assert code == 0
    assert "messages: 136 " in out


def test_trace_show_bad_filter_is_one_line_and_exit_2(capsys):
    code, out, err = run(capsys, "trace", "show", "-Y", "regoin == ROM", BOOT)
    assert code == 2 and out == ""
    assert err == ('vfioproxy trace show: filter: unknown field "regoin" at 0; '
                   'did you mean "region"?\n')


def test_trace_stats_by_step_refuses_a_filter(capsys):
    code, _, err = run(capsys, "trace", "stats", "--by-step", "-Y", "seq > 1", BOOT)
    assert code == 2 and "--by-step" in err

"""``trace show -v`` prints values as a reader wants them, never a Python repr;
``-x`` adds the hexdump of each whole message (tshark's ``-x``)."""

from __future__ import annotations

import enum
import re

import attrs
import pytest

from recorder.reader import TraceReader
from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.protocol.header import Command
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.filter import compile_filter, select

ALL = sorted(TRACES.glob("*.trace"))
BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"

#: a hexdump line (its ASCII column may hold anything)
HEXDUMP = re.compile(r"^\s+([0-9a-f]{4,})  ((?:[0-9a-f]{2} ){0,15}[0-9a-f]{2}) +\|.*\|$")
#: what Python's repr() of bytes, enums, containers and attrs instances looks like
REPR = re.compile(r"""\bb'|\bb"|<\w+(\.\w+)*: -?\d+>|\{'|\['|\('|(?<!\w)_?[A-Z]\w*\(\w+="""
                  r"|\bNone\b|\bTrue\b|\bFalse\b")


@attrs.frozen
class _Body:
    offset: int


class _Kind(enum.IntEnum):
    ONE = 1


@pytest.mark.parametrize("value", [
    b"\x00ab", bytearray(b"x"), Command.VERSION, _Kind.ONE, {"a": 1}, ["a"], ("a",),
    _Body(3), None, True, False, [_Body(1)],
])
def test_the_repr_pattern_catches_every_python_repr(value):
    assert REPR.search(f"  field: {value!r}")


def text_of(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert err == "" or "warning" in err
    return out


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_verbose_output_of_every_real_trace_has_no_python_repr(capsys, path):
    out = text_of(capsys, "trace", "show", "-v", path)
    shown = [line for line in out.splitlines() if not HEXDUMP.match(line)]
    assert len(shown) > 50
    assert [line for line in shown if REPR.search(line)] == []
    # errnos are shown with their names, VERSION's JSON as JSON
    errors = [m for line in shown for m in re.findall(r"error=(\d+)( \([A-Z]+\))?", line)]
    assert all(name for number, name in errors if number != "0"), errors
    assert any(line.strip().startswith('"capabilities": {') for line in shown)


def messages(path, expr=None):
    with TraceReader(path) as reader:
        items = decoded_records(reader)
        chosen = items if expr is None else select(items, compile_filter(expr))
        return [i for i in chosen if isinstance(i, DecodedMessage)]


def raw_blocks(out):
    """Each ``raw:`` block of ``-x`` output: the message line above it and
    the bytes its hexdump lines hold (checking their offsets count from 0)."""
    lines = out.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip().startswith("raw: "):
            owner = next(lines[j] for j in range(i - 1, -1, -1)
                         if re.match(r"^\s*\d+ ", lines[j]) and not HEXDUMP.match(lines[j]))
            data = b""
            for dump in lines[i + 1:]:
                match = HEXDUMP.match(dump)
                if match is None:
                    break
                assert int(match.group(1), 16) == len(data)
                data += bytes.fromhex(match.group(2))
            blocks.append((int(owner.split()[0]), line.strip(), data))
    return blocks


@pytest.mark.parametrize("verbose", [False, True])
def test_x_dumps_every_whole_message_after_its_lines(capsys, verbose):
    path = TRACES / "reference-realize-workload-msix-001.trace"
    out = text_of(capsys, "trace", "show", "-x", *(["-v"] if verbose else []), path)
    expected = messages(path)
    blocks = raw_blocks(out)
    assert [seq for seq, _, _ in blocks] == [m.record.seq for m in expected]
    for (_, title, data), message in zip(blocks, expected, strict=True):
        assert data == message.record.data
        assert title == f"raw: {len(data)} bytes"
    assert (" payload: " in out) == verbose


def test_x_with_a_filter_dumps_only_the_messages_it_keeps(capsys):
    expr = "region == ROM or command == VERSION"
    out = text_of(capsys, "trace", "show", "-x", "-Y", expr, BOOT)
    blocks = raw_blocks(out)
    expected = messages(BOOT, expr)
    assert len(blocks) == len(expected) == 4
    assert [data for _, _, data in blocks] == [m.record.data for m in expected]
    assert len(blocks[-1][2]) > 0x40000  # the ROM, header included


def test_x_is_refused_with_json(capsys):
    assert main(["trace", "show", "-x", "--json", str(BOOT)]) == 2
    assert "-x is for the text listing" in capsys.readouterr().err

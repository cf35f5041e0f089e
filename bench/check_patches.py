"""Check that patched_proxy.py's candidate optimisations change nothing observable.

    .venv/bin/python bench/check_patches.py [--patches P1,P2,...] [--no-tests]

1. Every message of every trace under ``traces/`` goes through
   ``SessionState.observe`` as the proxy feeds it (per session, fds as a
   count), once as the code is and once patched: the decoded messages, the
   matched requests and the violations must be equal.
2. The same messages (and a 1 MiB one) are recorded with
   ``TraceWriter.write_message`` and, patched (``fast-record`` or
   ``writev-record``), the way the proxy would write them: the files must be
   identical.
3. Unless ``--no-tests``, the project's test suite runs with the patches applied.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import patched_proxy

from recorder.reader import TraceReader
from recorder.records import MessageRecord, TraceHeader
from recorder.writer import TraceWriter
from vfioproxy.protocol.header import HEADER_STRUCT as HEADER
from vfioproxy.protocol.session import SessionState
from vfioproxy.side import Direction

ROOT = Path(__file__).resolve().parent.parent
OPTIMISATIONS = ("recv-one-yield", "send-no-yield", "lazy-describe", "cached-limit",
                 "writev-record", "inline-digest", "malloc-tune")


def messages() -> list[tuple[str, MessageRecord]]:
    out = []
    for path in sorted((ROOT / "traces").glob("*.trace")):
        with TraceReader(path) as reader:
            out.extend((path.name, r) for r in reader if isinstance(r, MessageRecord))
    return out


def bad_session() -> list[tuple[Direction, bytes, int]]:
    """Messages that break every rule SessionState checks: (direction, bytes, fds)."""

    def msg(msg_id: int, command: int, flags: int, body: bytes = b"", size: int | None = None,
            error: int = 0) -> bytes:
        return HEADER.pack(msg_id, command, 16 + len(body) if size is None else size, flags,
                           error) + body

    access = struct.pack("<QII", 0, 7, 4)
    big = struct.pack("<QII", 0, 0, 1 << 30)
    c2s, s2c = Direction.C2S, Direction.S2C
    return [
        (c2s, msg(1, 9, 0, access), 0),  # not VERSION first
        (c2s, msg(2, 1, 0, b"\0\0\0\0{}\0"), 1),  # VERSION with an fd
        (s2c, msg(2, 1, 1, b"\0\0\0\0{}\0"), 0),
        (c2s, msg(3, 9, 0, big), 0),  # count too large
        (c2s, msg(4, 9, 0, access), 0),
        (c2s, msg(4, 9, 0, access), 0),  # duplicate outstanding id
        (s2c, msg(77, 9, 1, access + b"abcd"), 0),  # unknown reply id
        (s2c, msg(4, 10, 1, access), 0),  # reply names another command
        (s2c, msg(4, 9, 0x11, access + b"abcd"), 0),  # no_reply on a reply
        (c2s, msg(5, 9, 0x20, access), 0),  # error flag on a command
        (c2s, msg(6, 9, 0x3, access), 0),  # invalid type
        (c2s, msg(7, 9, 0x40, access), 0),  # unknown flag bits
        (c2s, msg(8, 9, 0, size=8), 0),  # size below 16 (header alone)
        (c2s, msg(9, 9, 0, size=1 << 30), 0),  # size above the limit (header alone)
        (c2s, msg(10, 11, 0, struct.pack("<QQ", 0, 4)), 0),  # DMA_READ from the client
        (c2s, msg(11, 99, 0, b"xyz"), 0),  # unknown command
        (c2s, msg(12, 9, 0, b"ab"), 0),  # body too short
        (c2s, msg(13, 2, 0, struct.pack("<IIQQQ", 32, 3, 0, 0, 4096)), 40),  # too many fds
        (s2c, msg(13, 2, 0x21, error=22), 0),
    ]


def observations(records: list[tuple[str, MessageRecord]]) -> list[Any]:
    states: dict[tuple[str, int], SessionState] = {}
    out = []
    feed = [(name, r.session, r.direction, r.data, len(r.fds)) for name, r in records]
    feed += [("bad", 1, d, data, fds) for d, data, fds in bad_session()]
    for name, session, direction, data, fds in feed:
        state = states.setdefault((name, session), SessionState())
        obs = state.observe(direction, data, range(fds))
        out.append((obs.index, obs.message, obs.request,
                    [v.to_dict() for v in obs.violations], state.max_message_size()))
    return out


def trace_bytes(
    records: list[tuple[str, MessageRecord]], header: TraceHeader, fast: bool
) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.trace")
        with TraceWriter(path, header) as writer:
            write = writer.append_message if fast else writer.write_message  # type: ignore
            for _, r in records:
                write(r.session, r.direction, r.t_ns, r.data, list(r.fds))
            for size in (0, 255, 256, 65535, 65536, 1 << 20):  # every bin header size
                write(9, Direction.S2C, 1, bytes(range(256)) * (size // 256) + bytes(size % 256))
        return Path(path).read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", default=",".join(OPTIMISATIONS))
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args()
    patches = [p for p in args.patches.split(",") if p]
    records = messages()
    before = observations(records)
    header = TraceHeader.now("check", {})
    plain_trace = trace_bytes(records, header, fast=False)
    patched_proxy.apply(patches)
    after = observations(records)
    differing = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    violations = sum(len(o[3]) for o in before)
    print(f"observe: {len(before)} messages ({len({n for n, _ in records})} traces and a "
          f"session of bad messages), {violations} violations: {len(differing)} differ")
    ok = not differing
    if "fast-record" in patches or "writev-record" in patches:
        same = trace_bytes(records, header, fast=True) == plain_trace
        print(f"record: {len(plain_trace)} bytes written, {'identical' if same else 'DIFFERENT'}")
        ok = ok and same
    if not args.no_tests:
        import pytest

        code = pytest.main([str(ROOT / "tests"), "-q", "-p", "no:cacheprovider"])
        print(f"test suite with {', '.join(patches)}: exit {code}")
        ok = ok and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

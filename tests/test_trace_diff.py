"""``vfioproxy trace diff``: two recorded sessions aligned and compared, on the
bundled real traces (and copies of them with one thing changed)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from recorder.records import EventRecord, MessageRecord
from recorder.writer import TraceWriter
from tests.realdata import TRACES, capture_files
from vfioproxy.cli import main
from vfioproxy.protocol.header import Command, Header
from vfioproxy.protocol.offsets import MSG_ID, MSG_ID_ONLY
from vfioproxy.replay.diff import LOOKAHEAD, _align, diff_scripts, load_session, parse_operand
from vfioproxy.replay.match import IgnoreRule
from vfioproxy.side import Direction

GPIO = [TRACES / f"qemu-realize-gpio-00{n}.trace" for n in (1, 2, 3)]
LVU = [TRACES / f"qemu-realize-libvfio-user-server-00{n}.trace" for n in (1, 2, 3)]
E1000E = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"
NVME = TRACES / "qemu-realize-qemu-server-nvme-001.trace"


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main(["trace", "diff", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def first_line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))


def copy_trace(
    src: Path, dst: Path, change: Callable[[MessageRecord], MessageRecord | None],
    *, session: int | None = None,
) -> Path:
    """``src`` rewritten message by message (None drops one), all in ``session``."""
    with TraceReader(src) as reader, TraceWriter(dst, reader.header) as writer:
        for record in reader:
            at = record.session if session is None else session
            if isinstance(record, MessageRecord):
                changed = change(record)
                if changed is not None:
                    writer.write_message(at, changed.direction, changed.t_ns, changed.data,
                                         changed.fds)
            elif isinstance(record, EventRecord):
                writer.write_event(at, record.kind, record.t_ns, record.data)
    return dst


def file_order(path: Path) -> list[tuple[str, int, int]]:
    """(direction, msg_id, type) of each message in file order."""
    with TraceReader(path) as reader:
        return [(r.direction.value, Header.parse(r.data).msg_id, Header.parse(r.data).type)
                for r in reader if isinstance(r, MessageRecord)]


# ---------------------------------------------------------------- equal


@pytest.mark.parametrize("path", capture_files(), ids=lambda p: p.stem)
def test_every_bundled_trace_equals_itself_exit_0(capsys, path):
    code, out, err = run(capsys, "--no-default-ignores", path, path)
    assert (code, err) == (0, "")
    assert "\nequal: " in out and "0 only in A, 0 only in B; 0 message(s) differ" in out


@pytest.mark.parametrize("runs", [GPIO, LVU], ids=["gpio", "libvfio-user-server"])
def test_three_runs_of_one_device_are_equal_though_their_messages_interleave_differently(
    capsys, runs
):
    orders = [file_order(p) for p in runs]
    assert len({tuple(o) for o in orders}) > 1  # the runs differ in file order...
    for other in runs[1:]:
        # ...and not in any field, msg_ids included: QEMU numbers from 0 each run
        code, out, _ = run(capsys, "--no-default-ignores", runs[0], other)
        assert code == 0, out
        assert "0 message(s) differ" in out
    times = first_line(out, "time (never compared): ")
    assert times.count(" ms") == 2


# ---------------------------------------------------------------- unequal, checked by hand


def test_gpio_against_the_sample_server_first_divergence_is_bar0_region_info(capsys):
    # by hand (trace show): #11 of both is the DEVICE_GET_REGION_INFO reply for
    # index 0; gpio has no BAR0 ("index 0 argsz 32"), samples/server's is
    # "flags READ|WRITE size 0x8"
    code, out, err = run(capsys, GPIO[0], LVU[0])
    assert (code, err) == (1, "")
    assert first_line(out, "FIRST DIVERGENCE: ") == (
        "FIRST DIVERGENCE: A #11 / B #11 DEVICE_GET_REGION_INFO reply (region BAR0): "
        "flags 0 != 3; size 0 != 8")
    assert first_line(out, ">>> ") == (
        ">>> A #11 / B #11 DEVICE_GET_REGION_INFO reply (region BAR0): flags 0 != 3; size 0 != 8")
    # samples/server's BAR1 is asked twice (argsz 32, then 80) and its BAR1
    # register read (0x14) gpio never does: those two exchanges are only in B
    only_b = [line for line in out.splitlines() if line.startswith("+")]
    assert only_b == [
        "+   B #14 DEVICE_GET_REGION_INFO cmd (region BAR1): only in B",
        "+   B #15 DEVICE_GET_REGION_INFO reply (region BAR1): only in B",
        "+   B #40 REGION_READ cmd (config space offset 0x14 BAR1): only in B",
        "+   B #41 REGION_READ reply (config space offset 0x14 BAR1): only in B",
    ]
    config = first_line(out, "!   A #27 / B #29 REGION_READ reply")
    assert "data[0x0:0x2] (vendor_id) 0x494f != 0xdead" in config
    assert "data[0x2:0x4] (device_id) 0x0dc8 != 0xbeef" in config
    assert first_line(out, "differ: ") == (
        "differ: 39 exchanges paired: 34 equal, 5 differ; 0 only in A, 2 only in B; "
        "10 message(s) differ")


def test_e1000e_against_nvme_pci_aware_on_each_side(capsys):
    code, out, _ = run(capsys, "--all", E1000E, NVME)
    assert code == 1
    # by hand: region info index 0 replies, e1000e BAR0 128 KiB, nvme 16 KiB
    assert first_line(out, "FIRST DIVERGENCE: ") == (
        "FIRST DIVERGENCE: A #11 / B #11 DEVICE_GET_REGION_INFO reply (region BAR0): "
        "size 0x20000 != 0x4000")
    # e1000e has BAR0..3, nvme BAR0 alone: QEMU reads BAR1..3 of e1000e only
    only_a = [line for line in out.splitlines() if line.startswith("-")]
    assert [line.split(" (")[1] for line in only_a] == [
        "config space offset 0x14 BAR1): only in A"] * 2 + [
        "config space offset 0x18 BAR2): only in A"] * 2 + [
        "config space offset 0x1c BAR3): only in A"] * 2 + [
        "config space offset 0xd2 MSI[0xd0].msg_ctl): only in A"] * 2
    # the same register of a capability at another offset pairs, each side
    # naming it in its own config space (MSI-X at 0xa0 in e1000e, 0x40 in nvme)
    assert ("!   A #44 / B #38 REGION_READ cmd (A: config space offset 0xa2 "
            "MSI-X[0xa0].msg_ctl; B: config space offset 0x42 MSI-X[0x40].msg_ctl): "
            "offset 0xa2 != 0x42") in out
    assert ("!   A #69 / B #61 REGION_READ reply (A: config space offset 0xcc PM[0xc8].pmcsr; "
            "B: config space offset 0x64 PM[0x60].pmcsr): offset 0xcc != 0x64; "
            "data 0x0000 != 0x0008") in out
    assert "!   A #51 / B #45 DEVICE_GET_IRQ_INFO reply (IRQ MSIX): count 0x5 != 0x41" in out
    assert "more exchange(s) differ" not in out  # --all


# ---------------------------------------------------------------- JSON and listing


def test_json_has_both_sides_the_counts_and_every_divergence(capsys):
    code, out, _ = run(capsys, "--json", GPIO[0], LVU[0])
    assert code == 1
    result = json.loads(out)
    assert result["equal"] is False
    assert result["a"]["trace"] == str(GPIO[0]) and result["b"]["session"] == 1
    assert result["a"]["messages"] == 78 and result["b"]["messages"] == 82
    assert result["ignore"] == ["*:header.msg_id", "VERSION:header.size"]
    first = result["first_divergence"]
    assert (first["kind"], first["seq_a"], first["seq_b"], first["where"]) == (
        "differs", 11, 11, "region BAR0")
    assert first["diffs"] == [{"field": "flags", "a": 0, "b": 3},
                              {"field": "size", "a": 0, "b": 8}]
    assert result["counts"] == {"exchanges": 41, "equal": 34, "differ": 5, "only_a": 0,
                                "only_b": 2, "messages_differ": 10}
    assert len(result["divergences"]) == 10
    assert [d["seq_b"] for d in result["divergences"] if d["kind"] == "only_b"] == [
        14, 15, 40, 41]

    code, out, _ = run(capsys, "--json", GPIO[0], GPIO[1])
    result = json.loads(out)
    assert (code, result["equal"], result["first_divergence"], result["divergences"]) == (
        0, True, None, [])


def test_context_and_all_shape_the_listing(capsys):
    _, few, _ = run(capsys, "--context", "0", "traces/libvfio-user-client-server-001.trace",
                    "traces/libvfio-user-client-server-002.trace")
    _, every, _ = run(capsys, "--all", "--context", "0",
                      "traces/libvfio-user-client-server-001.trace",
                      "traces/libvfio-user-client-server-002.trace")
    marked = [line for line in few.splitlines() if line[:1] in "!>-+"]
    assert len(marked) == 10 + 2  # 10 exchanges, one with its reply only in A
    assert "... 28 more exchange(s) differ" in few
    assert len([line for line in every.splitlines() if line[:1] in "!>-+"]) == 35 + 2 * 3
    # run 001 has 5 fake-guest BAR1 writes, run 002 has 2: 3 only in A
    assert every.count("REGION_WRITE cmd (BAR1 offset 0x0): only in A") == 3
    assert not any(line.startswith("    A #") for line in few.splitlines())  # no context
    _, wide, _ = run(capsys, "--context", "3", GPIO[0], LVU[0])
    assert "    A #8-#9 / B #8-#9 DEVICE_GET_INFO cmd" in wide


# ---------------------------------------------------------------- changed copies


def test_a_changed_byte_is_named_and_an_ignore_rule_for_its_range_hides_it(capsys, tmp_path):
    def vendor(record: MessageRecord) -> MessageRecord | None:
        # the 256-byte config read's reply: vendor ID low byte at body offset 16
        if record.direction is Direction.S2C and len(record.data) == 16 + 16 + 256:
            data = bytearray(record.data)
            data[32] ^= 0xFF
            return MessageRecord(record.seq, record.session, record.direction, record.t_ns,
                                 bytes(data), record.fds)
        return record

    changed = copy_trace(GPIO[0], tmp_path / "vendor.trace", vendor)
    code, out, _ = run(capsys, GPIO[0], changed)
    assert code == 1
    assert first_line(out, "FIRST DIVERGENCE: ") == (
        "FIRST DIVERGENCE: A #27 / B #27 REGION_READ reply (config space offset 0x0, "
        "256 bytes): data[0x0:0x2] (vendor_id) 0x494f != 0x49b0")
    code, out, _ = run(capsys, "--ignore", "REGION_READ reply:data[0x0:0x2]", GPIO[0], changed)
    assert code == 0, out
    assert "ignored: *:header.msg_id, VERSION:header.size, REGION_READ reply:data[0x0:0x2]" in out


def test_msg_ids_differ_only_without_the_default_ignores(capsys, tmp_path):
    def renumber(record: MessageRecord) -> MessageRecord:
        msg_id = (Header.parse(record.data).msg_id + 100) & 0xFFFF
        data = MSG_ID_ONLY.pack(msg_id) + record.data[MSG_ID.end:]
        return MessageRecord(record.seq, record.session, record.direction, record.t_ns,
                             data, record.fds)

    changed = copy_trace(GPIO[0], tmp_path / "ids.trace", renumber)
    assert run(capsys, GPIO[0], changed)[0] == 0
    code, out, _ = run(capsys, "--no-default-ignores", GPIO[0], changed)
    assert code == 1
    assert first_line(out, "FIRST DIVERGENCE: ") == (
        "FIRST DIVERGENCE: A #2 / B #2 VERSION cmd: header.msg_id 0x0 != 0x64")


def test_a_dropped_exchange_is_only_in_a_and_the_rest_still_pairs(capsys, tmp_path):
    # the second of the two interrupt-pin reads (config 0x3d) and its reply
    pin_reads = [r.seq for r in file_order_records(GPIO[0])
                 if r.direction is Direction.C2S and r.data[16:24] == bytes.fromhex(
                     "3d00000000000000")]
    dropped_cmd = pin_reads[1]
    with TraceReader(GPIO[0]) as reader:
        messages = [r for r in reader if isinstance(r, MessageRecord)]
    cmd = next(r for r in messages if r.seq == dropped_cmd)
    msg_id = Header.parse(cmd.data).msg_id
    reply = next(r for r in messages if r.direction is Direction.S2C
                 and Header.parse(r.data).msg_id == msg_id)
    changed = copy_trace(GPIO[0], tmp_path / "dropped.trace",
                         lambda r: None if r.seq in (cmd.seq, reply.seq) else r)
    code, out, _ = run(capsys, GPIO[0], changed)
    assert code == 1
    assert [line for line in out.splitlines() if line[:1] in "!>-+"] == [
        f">>> A #{cmd.seq} REGION_READ cmd (config space offset 0x3d interrupt_pin): only in A",
        f"-   A #{reply.seq} REGION_READ reply (config space offset 0x3d interrupt_pin): "
        "only in A",
    ]
    assert first_line(out, "differ: ").startswith(
        "differ: 38 exchanges paired: 38 equal, 0 differ; 1 only in A, 0 only in B")
    # and the other way round
    code, out, _ = run(capsys, changed, GPIO[0])
    assert "1 only in B" in out


def file_order_records(path: Path) -> list[MessageRecord]:
    with TraceReader(path) as reader:
        return [r for r in reader if isinstance(r, MessageRecord)]


# ---------------------------------------------------------------- sessions and errors


@pytest.fixture
def two_sessions(tmp_path: Path) -> Path:
    """gpio-001 as session 1 and samples/server-001 as session 2 of one file."""
    path = tmp_path / "two.trace"
    with TraceReader(GPIO[0]) as reader, TraceWriter(path, reader.header) as writer:
        for n, src in ((1, GPIO[0]), (2, LVU[0])):
            for record in file_order_records(src):
                writer.write_message(n, record.direction, record.t_ns, record.data, record.fds)
    return path


def test_sessions_of_one_file_are_named_file_colon_session(capsys, two_sessions):
    code, out, _ = run(capsys, f"{two_sessions}:1", f"{two_sessions}:2")
    assert code == 1
    assert out.startswith(f"A: {two_sessions} session 1: 78 messages")
    assert f"\nB: {two_sessions} session 2: 82 messages" in out
    assert run(capsys, f"{two_sessions}:1", GPIO[2])[0] == 0
    code, _, err = run(capsys, two_sessions, GPIO[2])
    assert (code, err) == (2, f"vfioproxy trace diff: {two_sessions}: name the session as "
                              f"{two_sessions}:N; sessions with messages: 1, 2\n")
    code, _, err = run(capsys, f"{two_sessions}:7", GPIO[2])
    assert (code, err) == (2, f"vfioproxy trace diff: {two_sessions}: no session 7 in the "
                              "trace (sessions with messages: 1, 2)\n")


def test_a_file_whose_name_ends_in_colon_digits_is_a_file(tmp_path):
    odd = tmp_path / "run:2"
    odd.write_bytes(GPIO[0].read_bytes())
    assert parse_operand(str(odd)) == (str(odd), None)
    assert parse_operand(f"{odd}:1") == (str(odd), 1)
    assert parse_operand("missing.trace:3") == ("missing.trace", 3)


@pytest.mark.parametrize("argv, error", [
    (["nope.trace", GPIO[0]], "nope.trace: No such file or directory"),
    ([GPIO[0], "--max-messages", "50", LVU[0]],
     f"{GPIO[0]}: session 1 has 78 messages, more than --max-messages 50"),
    ([Path(__file__), GPIO[0]], f"{Path(__file__)}: not a vfioproxy trace"),
])
def test_what_cannot_run_exits_2_with_one_line(capsys, argv, error):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith(f"vfioproxy trace diff: {error}")
    assert err.count("\n") == 1


def test_a_bad_ignore_rule_exits_2_before_reading(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["trace", "diff", "--ignore", "REGION_READ:offst", "nope.trace", "nope.trace"])
    assert exited.value.code == 2
    assert "bad ignore rule 'REGION_READ:offst': unknown field 'offst' (did you mean offset?)" \
        in capsys.readouterr().err


def test_the_engine_compares_as_the_cli_does():
    with TraceReader(GPIO[0]) as ra, TraceReader(LVU[0]) as rb:
        a, b = load_session(ra), load_session(rb)
    report = diff_scripts(a, b)
    assert report.exit_status == 1 and not report.equal
    relaxed = diff_scripts(a, b, ignore=[IgnoreRule("*", "*")])
    # everything ignored: the only differences left are exchanges one side lacks
    assert {row.kind for row in relaxed.rows} == {"equal", "only_b"}
    assert all(step.message.command in (Command.DEVICE_GET_REGION_INFO, Command.REGION_READ)
               for row in relaxed.rows if row.kind == "only_b"
               for step in row.b.steps)


def test_a_display_filter_limits_the_comparison_to_the_exchanges_it_passes(capsys):
    # e1000e and nvme differ, but q35's DMA layout does not depend on the device
    code, out, _ = run(capsys, "-Y", "command == DMA_MAP or command == DMA_UNMAP", E1000E, NVME)
    assert code == 0, out
    assert "48 exchanges, 7 selected by -Y" in out
    assert "equal: 7 exchanges paired: 7 equal" in out
    code, out, _ = run(capsys, "--json", "-Y", "region == config", E1000E, NVME)
    result = json.loads(out)
    assert code == 1 and result["filter"] == "region == config"
    assert {d["message"].split()[0] for d in result["divergences"]} == {"REGION_READ"}
    assert result["a"]["selected"] < result["a"]["exchanges"]
    code, out, err = run(capsys, "-Y", "regoin == config", E1000E, NVME)
    assert (code, out) == (2, "")
    assert err == ('vfioproxy trace diff: filter: unknown field "regoin" at 0; '
                   'did you mean "region"?\n')


def readme_examples() -> list[tuple[list[str], str]]:
    """README's ``$ vfioproxy trace diff ...`` examples on bundled traces, with
    the output shown under each."""
    readme = (TRACES.parent / "README.md").read_text()
    section = readme.split("### Comparing two sessions: trace diff\n", 1)[1].split("\n### ")[0]
    examples = []
    for block in section.split("```\n")[1::2]:
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ vfioproxy trace diff ") or "|" in line:
                continue
            argv = shlex.split(line[len("$ vfioproxy trace diff "):])
            files = [a for a in argv if a.endswith(".trace")]
            if not all(a.startswith("traces/") for a in files):
                continue
            out = []
            for following in lines[i + 1:]:
                if following.startswith("$ "):
                    break
                out.append(following)
            examples.append((argv, "\n".join(out) + "\n"))
    return examples


def test_readme_shows_the_real_output_of_its_examples_on_bundled_traces(capsys, monkeypatch):
    monkeypatch.chdir(TRACES.parent)
    examples = readme_examples()
    assert len(examples) >= 3
    for argv, shown in examples:
        code, out, _ = run(capsys, *argv)
        assert out == shown, argv
        assert code == (0 if "\nequal: " in shown else 1)


def align(xs, ys, *, also=None, lookahead=LOOKAHEAD):
    """``_align`` on stand-in exchanges: (kind, value) pairs, keyed exactly, then by kind."""
    keys = (lambda e: e, lambda e: e[0])
    return list(_align(xs, ys, keys, lookahead, also))


def test_alignment_takes_the_nearest_partner_and_the_earliest_like_replay_server():
    w1, w2, w3, r = ("W", 1), ("W", 2), ("W", 3), ("R", 0)
    # B lacks w1: skipping one of A's is nearer than anything else
    assert align([w1, w2, w3], [w2, w3]) == [(w1, None), (w2, w2), (w3, w3)]
    assert align([w2, w3], [w1, w2, w3]) == [(None, w1), (w2, w2), (w3, w3)]
    # no exact partner: the same kind pairs (and is compared), another kind does not
    assert align([w1, r], [w3, r]) == [(w1, w3), (r, r)]
    assert align([r], [w1]) == [(r, None), (None, w1)]
    # only within the lookahead
    assert align([w1, w2, w3], [w3], lookahead=1) == [(w1, w3), (w2, None), (w3, None)]
    # what an ignore rule for a byte range leaves equal pairs as a replay matches:
    # the earliest that matches, not the one that is also byte-equal further on
    near = ("W", 12)
    same_tens = lambda x, y: x[0] == y[0] and x[1] // 10 == y[1] // 10  # noqa: E731
    assert align([("W", 11), near], [near]) == [(("W", 11), None), (near, near)]
    assert align([("W", 11), near], [near], also=same_tens) == [(("W", 11), near),
                                                                 (near, None)]


def test_a_changed_value_in_a_repetitive_stream_pairs_where_it_is():
    # doorbell-like writes: the changed one must not pair with the same value
    # two exchanges on and leave the two between unpaired
    d1, d2, changed = ("W", 1), ("W", 2), ("W", 9)
    xs, ys = [d1, d2, d1, d2, d1, d2], [d1, changed, d1, d2, d1, d2]
    assert align(xs, ys) == list(zip(xs, ys, strict=True))
    # a skip counts only when the sides then go on matching
    assert align([d1, d2, d1], [d2, d1]) == [(d1, None), (d2, d2), (d1, d1)]


def test_a_trace_without_messages_cannot_be_diffed(capsys, tmp_path):
    empty = tmp_path / "empty.trace"
    with TraceReader(GPIO[0]) as reader, TraceWriter(empty, reader.header) as writer:
        writer.write_event(1, "session_open", 1, {})
    code, out, err = run(capsys, empty, GPIO[0])
    assert (code, out, err) == (2, "", f"vfioproxy trace diff: {empty}: the trace holds no "
                                       "messages\n")

"""Per-step times of a trace's client sessions, on real captures and traces
written from them (two devices on one QEMU, a guest reset, a trace cut short)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from recorder.records import EventKind, MessageRecord
from recorder.writer import TraceWriter
from vfioproxy.cli import main
from vfioproxy.protocol.header import Header
from vfioproxy.protocol.offsets import MSG_ID, MSG_ID_ONLY
from vfioproxy.side import Direction
from vfioproxy.trace.timeline.build import session_timelines
from vfioproxy.trace.timeline.model import REALIZE_STEPS, RESET_STEPS, SessionTimeline
from vfioproxy.trace.timeline.steps import STEP_INFO

from .realdata import TRACES, capture_messages

E1K = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"
NVME = TRACES / "qemu-realize-qemu-server-nvme-001.trace"
E1K_BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"


def only(path: Path) -> SessionTimeline:
    (timeline,) = session_timelines(path)
    return timeline


def test_step_times_add_up_to_the_session() -> None:
    timeline = only(E1K)
    messages = list(capture_messages(E1K))
    assert sum(s.messages for s in timeline.steps) == len(messages) == len(timeline.messages)
    assert sum(s.bytes for s in timeline.steps) == sum(m.wire_length for m in messages)
    assert [s.step for s in timeline.steps] == [*REALIZE_STEPS, *RESET_STEPS]
    assert not timeline.cut_short and timeline.unlabelled == 0
    for step in timeline.steps:
        assert step.first_ns <= step.last_ns
        assert step.server_ns > 0
        assert step.server_ns + step.client_ns <= step.duration_ns
        assert step.rom_bytes is None and step.rom_throughput is None
    r7 = timeline.step("R7")
    assert r7 is not None and r7.messages == 2 and r7.bytes == 32 + 4128
    assert r7.server_ns == r7.duration_ns and r7.client_ns == 0


def test_a_messages_function_is_its_steps_qemu_function() -> None:
    timeline = only(E1K)
    assert {m.function for m in timeline.messages if m.label.step == "R8"} == {
        STEP_INFO["R8"].function}
    assert all(m.summary for m in timeline.messages)


def test_the_e1000e_boot_rom_load_reads_256_kib_and_has_a_throughput() -> None:
    rom = only(E1K_BOOT).step("rom-load")
    assert rom is not None
    assert rom.messages == 4 and rom.rom_bytes == 256 * 1024
    assert rom.rom_throughput == pytest.approx(rom.rom_bytes / (rom.duration_ns / 1e9))
    assert rom.server_ns > 0 and rom.server_ns + rom.client_ns <= rom.duration_ns


def test_a_trace_cut_short_is_labelled_up_to_where_it_ends(tmp_path: Path) -> None:
    whole = only(E1K)
    data = E1K.read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) * 2 // 3])
    timeline = only(cut)
    assert timeline.cut_short
    n = len(timeline.messages)
    assert 0 < n < len(whole.messages)
    assert [m.label for m in timeline.messages] == [m.label for m in whole.messages[:n]]


def _renumbered(record: MessageRecord, msg_id: int) -> bytes:
    data = bytearray(record.data)
    MSG_ID_ONLY.pack_into(data, MSG_ID.offset, msg_id)
    return bytes(data)


def _write(path: Path, sessions: dict[int, list[MessageRecord]], order: list[int]) -> None:
    """Sessions' messages into one trace, the next message of the session ``order``
    names in turn, the client's commands numbered from one counter (QEMU's)."""
    with TraceReader(E1K) as reader:
        header = reader.header
    queues = {s: list(records) for s, records in sessions.items()}
    ids: dict[tuple[int, int], int] = {}
    counter = 0
    t_ns = 0
    with TraceWriter(path, header) as writer:
        for session in sessions:
            writer.write_event(session, EventKind.SESSION_OPEN, 0)
        for session in order:
            record = queues[session].pop(0)
            data = record.data
            parsed = Header.parse(data)
            client_side = (record.direction is Direction.C2S) != parsed.is_reply
            if client_side:
                key = (session, parsed.msg_id)
                if not parsed.is_reply:
                    counter += 1
                    ids[key] = counter
                data = _renumbered(record, ids[key])
            t_ns = max(t_ns + 1, record.t_ns)
            writer.write_message(session, record.direction, t_ns, data, record.fds)
        for session in sessions:
            writer.write_event(session, EventKind.SESSION_CLOSE, t_ns)


def _interleave(a: int, b: int) -> Iterator[int]:
    for i in range(max(a, b)):
        if i < a:
            yield 1
        if i < b:
            yield 2


def test_two_devices_on_one_qemu_label_as_each_alone(tmp_path: Path) -> None:
    e1k, nvme = list(capture_messages(E1K)), list(capture_messages(NVME))
    path = tmp_path / "two.trace"
    _write(path, {1: e1k, 2: nvme}, list(_interleave(len(e1k), len(nvme))))
    first, second = session_timelines(path)
    assert (first.session, second.session) == (1, 2)
    ids = [m.msg_id for m in first.messages if not m.is_reply]
    assert ids == sorted(set(ids)) and len(ids) < ids[-1]
    assert [m.label for m in first.messages] == [m.label for m in only(E1K).messages]
    assert [m.label for m in second.messages] == [m.label for m in only(NVME).messages]
    assert [s.messages for s in first.steps] == [s.messages for s in only(E1K).steps]


@pytest.mark.parametrize("base", [E1K, TRACES / "reference-realize-workload-msix-001.trace"],
                         ids=lambda p: p.name)
def test_a_guest_triggered_second_reset_is_a_guest_reset_step_by_step(
    base: Path, tmp_path: Path
) -> None:
    whole = only(base)
    records = list(capture_messages(base))
    reset = [r for r, m in zip(records, whole.messages, strict=True)
             if m.label.step in RESET_STEPS]
    assert len(reset) >= 2 * 17
    path = tmp_path / "guest-reset.trace"
    again = [MessageRecord(r.seq, r.session, r.direction, r.t_ns + 10**9, r.data, r.fds)
             for r in reset]
    _write(path, {1: records + again}, [1] * (len(records) + len(again)))
    timeline = only(path)
    labels = [m.label for m in timeline.messages]
    assert labels[: len(records)] == [m.label for m in whole.messages]
    second = labels[len(records):]
    assert {label.step for label in second} == {"guest-reset"}
    assert all(label.certain for label in second)
    assert [label.substep for label in second] == [
        m.label.step for m in whole.messages if m.label.step in RESET_STEPS]
    assert second[0].text() == "guest-reset S1"
    guest = timeline.step("guest-reset")
    assert guest is not None and guest.messages == len(reset)


def test_trace_stats_by_step_prints_one_row_per_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "stats", "--by-step", str(E1K_BOOT)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{E1K_BOOT} session 1"
    assert "270 messages, 0 unlabelled" in lines
    rows = {line.split()[0]: line.split() for line in lines[3:] if line[:1].isalnum()}
    assert list(rows)[:3] == ["R1", "R2", "R3"]
    assert rows["R7"][1:3] == ["config", "copy"] and rows["R7"][-1] == "4160"
    rom_load = only(E1K_BOOT).step("rom-load")
    assert rom_load is not None and rom_load.rom_throughput is not None
    assert float(rows["rom-load"][-1]) == pytest.approx(rom_load.rom_throughput / 1e6, abs=0.05)


def test_trace_stats_by_step_json_has_the_step_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "stats", "--by-step", "--json", "--session", "1", str(E1K)]) == 0
    (session,) = json.loads(capsys.readouterr().out)["sessions"]
    assert session["cut_short"] is False and session["unlabelled"] == 0
    steps = {s["step"]: s for s in session["steps"]}
    assert [s["messages"] for s in steps.values()] == [s.messages for s in only(E1K).steps]
    assert steps["R8"]["duration_ns"] == steps["R8"]["last_ns"] - steps["R8"]["first_ns"]


def test_trace_stats_by_step_says_when_the_trace_was_cut_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = E1K.read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) // 2])
    assert main(["trace", "stats", "--by-step", str(cut)]) == 0
    out, err = capsys.readouterr()
    assert "cut short: the trace ends inside this session; labelled up to its last message" in out
    assert "trace truncated after record" in err


@pytest.mark.parametrize("path", sorted(TRACES.glob("*.trace")), ids=lambda p: p.name)
def test_the_server_and_client_shares_never_exceed_the_steps_duration(path: Path) -> None:
    # the libvfio-user realize's S7 has a reply recorded before the next DMA_MAP of
    # its burst: record times of the two directions need not be in order
    for timeline in session_timelines(path):
        for step in timeline.steps:
            assert step.server_ns + step.client_ns <= step.duration_ns, step


def _e1k_steps(*steps: str) -> list[MessageRecord]:
    """The E1K capture's messages of ``steps`` (commands and replies), in order."""
    pairs = zip(capture_messages(E1K), only(E1K).messages, strict=True)
    return [record for record, m in pairs if m.label.step in steps]


def test_an_s2_that_nothing_confirms_as_a_reset_is_uncertain(tmp_path: Path) -> None:
    # a reset that begins with S2 (no S1: INTx pin 0) is one once S3/S4/S5 follows
    records = _e1k_steps(*REALIZE_STEPS, "S2")
    path = tmp_path / "s2.trace"
    _write(path, {1: records}, [1] * len(records))
    labels = [m.label for m in only(path).messages]
    assert [label.text() for label in labels[-4:]] == ["S2?"] * 4
    assert "§4.4" in labels[-1].reason
    confirmed = _e1k_steps(*REALIZE_STEPS, "S2", "S4")
    path = tmp_path / "s2-s4.trace"
    _write(path, {1: confirmed}, [1] * len(confirmed))
    assert [m.label.text() for m in only(path).messages[-6:]] == ["S2"] * 4 + ["S4"] * 2


def test_an_s2_followed_by_guest_traffic_is_a_guest_command_register_access(
    tmp_path: Path,
) -> None:
    boot = list(capture_messages(E1K_BOOT))
    pairs = list(zip(boot, only(E1K_BOOT).messages, strict=True))
    realize = [r for r, m in pairs if m.label.step in REALIZE_STEPS or m.label.step == "S2"]
    bar = [r for r, m in pairs if m.label.step == "bar-mmio"][:2]
    path = tmp_path / "s2-guest.trace"
    _write(path, {1: realize + bar}, [1] * (len(realize) + len(bar)))
    labels = [m.label for m in only(path).messages]
    assert [label.text() for label in labels[-6:]] == ["guest-config?"] * 4 + ["bar-mmio"] * 2


def test_a_guest_reset_with_msix_on_begins_with_the_msix_disable_and_intx_fallback(
    tmp_path: Path,
) -> None:
    # QEMU's S1 with MSI-X active (vfio_msix_disable -> vfio_intx_enable, then
    # vfio_intx_disable): IRQS(2,0x21,0), RD1 @0x3d, IRQS(0,0x24,1)+fd, IRQS(0,0x21,0)
    base = TRACES / "reference-realize-workload-msix-001.trace"
    records = list(capture_messages(base))
    pairs = list(zip(records, only(base).messages, strict=True))

    def messages(step: str, first: int = 0, count: int = 2) -> list[MessageRecord]:
        found = [r for r, m in pairs if m.label.step == step]
        return [MessageRecord(r.seq, r.session, r.direction, r.t_ns + 10**9, r.data, r.fds)
                for r in found[first:first + count]]

    msix_off = [r for r, m in pairs if m.label.step == "msix-enable"
                and "MSIX DATA_NONE|ACTION_TRIGGER" in m.summary][:1]
    assert msix_off
    msix_off.append(next(r for r, m in pairs if m.seq == msix_off[0].seq + 1))
    s1 = msix_off + messages("S5", 0, 4) + messages("S1")
    rest = [m for step in RESET_STEPS[1:] for m in messages(step, 0, 100)]
    path = tmp_path / "msix-reset.trace"
    tail = s1 + rest
    _write(path, {1: records + tail}, [1] * (len(records) + len(tail)))
    labels = [m.label for m in only(path).messages][len(records):]
    assert [label.text() for label in labels[:8]] == ["guest-reset S1"] * 8
    assert {label.step for label in labels} == {"guest-reset"}
    assert all(label.certain for label in labels)


def test_an_msix_enable_right_before_a_guest_reset_stays_msix_enable(tmp_path: Path) -> None:
    base = TRACES / "reference-realize-workload-msix-001.trace"
    records = list(capture_messages(base))
    pairs = list(zip(records, only(base).messages, strict=True))
    later = [MessageRecord(r.seq, r.session, r.direction, r.t_ns + 10**9, r.data, r.fds)
             for r, _ in pairs]
    msix = [later[i] for i, (_, m) in enumerate(pairs) if m.label.step == "msix-enable"][-4:]
    reset = [later[i] for i, (_, m) in enumerate(pairs) if m.label.step in RESET_STEPS]
    path = tmp_path / "msix-then-reset.trace"
    tail = msix + reset
    _write(path, {1: records + tail}, [1] * (len(records) + len(tail)))
    labels = [m.label for m in only(path).messages][len(records):]
    assert [label.text() for label in labels[:4]] == ["msix-enable"] * 4
    assert [label.text() for label in labels[4:6]] == ["guest-reset S1"] * 2

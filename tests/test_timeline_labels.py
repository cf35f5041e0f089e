"""The labeller on the bundled real QEMU captures (realize-steps.md §1.4, §2)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from vfioproxy.protocol.bodies import IrqSetBody, RegionAccessBody
from vfioproxy.protocol.codec import build_command, build_reply, encode
from vfioproxy.protocol.constants import IrqIndex
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.timeline.labels import label_messages
from vfioproxy.trace.timeline.model import REALIZE_STEPS, RESET_STEPS, STEP_ORDER, UNLABELLED, Label
from vfioproxy.trace.timeline.steps import STEP_INFO

from .realdata import TRACES

QEMU_CAPTURES = sorted(TRACES.glob("qemu-*.trace"))

#: realize-steps.md §1.4, per-step command counts (R1..R14 | S1..S7) per server
COUNTS_BY_SERVER = {
    "libvfio-user-server": "1 2 1 7 1 1 1 4 2 0 0 1 2 1 | 1 2 0 1 2 6 5",
    "gpio": "1 2 1 6 1 1 1 4 1 0 0 1 2 1 | 1 2 0 1 2 6 5",
    "qemu-server-e1000e": "1 2 1 6 1 1 1 4 4 4 1 1 2 1 | 1 2 1 1 2 6 5",
    "qemu-server-nvme": "1 2 1 6 1 1 1 4 1 4 0 1 2 1 | 1 2 1 1 2 6 5",
}
#: every bundled realize capture (the -001 ones are §1.4's) with its server's counts
COUNTS = {
    path.name: counts
    for server, counts in COUNTS_BY_SERVER.items()
    for path in TRACES.glob(f"qemu-realize-{server}-*.trace")
}


def labelled(path: Path) -> list[tuple[DecodedMessage, Label]]:
    with TraceReader(path) as reader:
        return label_messages(
            item for item in decoded_records(reader) if isinstance(item, DecodedMessage))


def commands(pairs: list[tuple[DecodedMessage, Label]]) -> list[tuple[DecodedMessage, Label]]:
    return [(m, label) for m, label in pairs
            if m.record.direction is Direction.C2S and not m.observation.message.is_reply]


def test_the_design_counts_cover_every_bundled_realize_capture() -> None:
    assert sorted(COUNTS) == sorted(p.name for p in TRACES.glob("qemu-realize-*.trace"))
    assert len(COUNTS) == 8


def test_every_step_has_its_qemu_function() -> None:
    assert set(STEP_INFO) == set(STEP_ORDER)
    assert all(STEP_INFO[step].function for step in (*REALIZE_STEPS, *RESET_STEPS))


@pytest.mark.parametrize("path", QEMU_CAPTURES, ids=lambda p: p.name)
def test_every_message_of_a_real_qemu_capture_gets_a_label(path: Path) -> None:
    pairs = labelled(path)
    assert pairs
    assert [(m.record.seq, label) for m, label in pairs if label.step == UNLABELLED] == []


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_realize_and_reset_steps_come_in_order_with_the_counts_of_the_design(name: str) -> None:
    pairs = commands(labelled(TRACES / name))
    steps = [label.step for _, label in pairs]
    assert all(label.certain for _, label in pairs)
    order = [s for s in STEP_ORDER if s in steps]
    first_seen = list(dict.fromkeys(steps))
    assert first_seen == order
    assert steps == sorted(steps, key=STEP_ORDER.index)
    counts = Counter(steps)
    realize, reset = COUNTS[name].split(" | ")
    assert [counts[s] for s in REALIZE_STEPS] == [int(n) for n in realize.split()]
    assert [counts[s] for s in RESET_STEPS] == [int(n) for n in reset.split()]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_replies_take_the_label_of_their_request(name: str) -> None:
    pairs = labelled(TRACES / name)
    by_request = {(m.record.direction, m.observation.message.msg_id): label
                  for m, label in commands(pairs)}
    replies = [(m, label) for m, label in pairs if m.observation.message.is_reply]
    assert len(replies) == len(commands(pairs))
    for m, label in replies:
        assert by_request[(m.record.direction.reverse, m.observation.message.msg_id)] == label


def test_the_e1000e_boot_loads_its_256_kib_rom_after_the_reset() -> None:
    pairs = labelled(TRACES / "qemu-boot-qemu-server-e1000e-001.trace")
    rom = [(m, label) for m, label in pairs if label.step == "rom-load"]
    assert [m.observation.message.command for m, _ in rom] == [
        Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_INFO,
        Command.REGION_READ, Command.REGION_READ,
    ]
    reply = rom[-1][0].observation.message.body
    assert isinstance(reply, RegionAccessBody)
    assert len(reply.data) == 256 * 1024 and reply.data[:2] == b"\x55\xaa"
    steps = [label.step for _, label in pairs]
    assert steps.index("rom-load") > max(i for i, s in enumerate(steps) if s == "S7")


def test_the_nvme_boot_shows_its_posted_doorbell_writes_and_intx_eois() -> None:
    pairs = commands(labelled(TRACES / "qemu-boot-qemu-server-nvme-001.trace"))
    posted = [m for m, label in pairs if label.step == "bar-mmio-posted"]
    assert len(posted) == 525
    assert all(m.observation.message.header.no_reply for m in posted)
    doorbells = Counter(m.observation.message.body.offset for m in posted
                        if isinstance(m.observation.message.body, RegionAccessBody)
                        and m.observation.message.body.offset in (0x1000, 0x1004))
    assert sum(doorbells.values()) == 518
    eois = [i for i, (_, label) in enumerate(pairs) if label.step == "intx-eoi"]
    assert len(eois) == 202
    assert all(pairs[i][1].certain for i in eois)
    after = Counter(pairs[i - 1][0].observation.message.body.offset for i in eois)
    assert after == {0x1004: 163, 0x1000: 39}
    assert "guest-reset" not in {label.step for _, label in pairs}


def test_where_the_wire_cannot_tell_the_label_is_uncertain_with_the_reason() -> None:
    pairs = commands(labelled(TRACES / "qemu-boot-qemu-server-e1000e-001.trace"))
    s7 = [label for _, label in pairs if label.step == "S7"]
    assert len(s7) == 5
    assert all(not label.certain and "§4.6" in label.reason for label in s7)
    assert s7[0].text() == "S7?"
    assert all(label.certain for _, label in pairs if label.step.startswith("R"))


@pytest.mark.parametrize("name", ["reference-realize-workload-intx-001.trace",
                                  "reference-realize-workload-msix-001.trace"])
def test_the_servers_dma_and_the_replies_to_it_are_device_dma(name: str) -> None:
    pairs = labelled(TRACES / name)
    dma = [(m, label) for m, label in pairs
           if m.observation.message.command in (Command.DMA_READ, Command.DMA_WRITE)]
    assert dma
    assert {label for _, label in dma} == {Label("device-dma")}
    assert {m.record.direction for m, _ in dma if m.observation.message.is_reply} == {
        Direction.C2S}
    assert [(m.record.seq, label) for m, label in pairs if label.step == UNLABELLED] == []
    steps = {label.step for _, label in pairs}
    assert "bar-mmio" in steps
    assert ("intx-eoi" in steps) == ("intx" in name) and ("msix-enable" in steps) == (
        "msix" in name)


def _access(msg_id: int, region: int, offset: int, data: bytes, t_ns: int,
            seq: int) -> list[DecodedMessage]:
    """A REGION_READ of ``region`` at ``offset`` and its reply carrying ``data``,
    decoded as a trace reader decodes them."""
    command = build_command(Command.REGION_READ, msg_id,
                            RegionAccessBody(offset, region, len(data)))
    reply = build_reply(command, RegionAccessBody(offset, region, len(data), data))
    records = [MessageRecord(seq, 1, Direction.C2S, t_ns, encode(command)[0]),
               MessageRecord(seq + 1, 1, Direction.S2C, t_ns + 1, encode(reply)[0])]
    return [i for i in decoded_records(records) if isinstance(i, DecodedMessage)]


def test_a_read_in_the_msix_pba_is_pba_read_but_marked_unsure() -> None:
    # the reference device's MSI-X: 4 vectors, PBA in BAR2 at 0x9000 (R10's replies)
    path = TRACES / "reference-realize-workload-msix-001.trace"
    with TraceReader(path) as reader:
        records = [r for r in reader if isinstance(r, MessageRecord)]
    last = records[-1]
    extra = [(0x9000, "pba-read"), (0x9008, "bar-mmio"), (0x8ff8, "bar-mmio")]
    tail: list[MessageRecord] = []
    for i, (offset, _) in enumerate(extra):
        for m in _access(0x7000 + i, 2, offset, bytes(8), last.t_ns + 10 * i,
                         last.seq + 1 + 2 * i):
            tail.append(m.record)
    with TraceReader(path) as reader:
        head = [i for i in decoded_records(reader) if isinstance(i, DecodedMessage)]
    pairs = label_messages([*head, *(i for i in decoded_records(tail)
                                     if isinstance(i, DecodedMessage))])
    got = [label for _, label in pairs[len(head)::2]]
    assert [label.step for label in got] == [step for _, step in extra]
    assert not got[0].certain and "§4.7" in got[0].reason
    assert got[1].certain and got[2].certain


def _irqs(msg_id: int, flags: int, count: int) -> list[MessageRecord]:
    """SET_IRQS on INTx (start 0) and its reply, as records."""
    command = build_command(Command.DEVICE_SET_IRQS, msg_id,
                            IrqSetBody(20, flags, IrqIndex.INTX, 0, count))
    reply = build_reply(command)
    return [MessageRecord(0, 1, Direction.C2S, 0, encode(command)[0]),
            MessageRecord(0, 1, Direction.S2C, 0, encode(reply)[0])]


@pytest.mark.parametrize("err_notifier", [True, False])
def test_the_kvm_intx_extras_belong_to_r13_and_to_s1(err_notifier: bool) -> None:
    # vfio_intx_enable_kvm after R13's trigger: mask, resample eventfd, unmask;
    # vfio_intx_disable_kvm before S1's IRQS(0,0x21,0): mask, unmask
    base = labelled(TRACES / "qemu-realize-qemu-server-e1000e-001.trace")
    records: list[MessageRecord] = []
    expected: list[str] = []
    for m, label in base:
        if label.step == "R14" and not err_notifier:
            continue
        if label.step == "S1" and not m.observation.message.is_reply:
            for i, flags in enumerate((0x09, 0x11)):
                records += _irqs(0x7100 + i, flags, 1)
                expected += ["S1", "S1"]
        records.append(m.record)
        expected.append(label.step)
        if label.step == "R13" and m.observation.message.is_reply and len(
                [s for s in expected if s == "R13"]) == 4:
            for i, flags in enumerate((0x09, 0x14, 0x11)):
                records += _irqs(0x7000 + i, flags, 1)
                expected += ["R13", "R13"]
    numbered = [MessageRecord(seq, 1, r.direction, seq, r.data, r.fds)
                for seq, r in enumerate(records, 1)]
    pairs = label_messages(i for i in decoded_records(numbered) if isinstance(i, DecodedMessage))
    assert [label.step for _, label in pairs] == expected


@pytest.mark.parametrize("path", sorted(TRACES.glob("*.trace")), ids=lambda p: p.name)
def test_every_unlabelled_or_unsure_message_says_why(path: Path) -> None:
    # the libvfio-user client's sessions are no QEMU's: many unlabelled, none silent
    for _, label in labelled(path):
        if label.step == UNLABELLED or not label.certain:
            assert label.reason
        else:
            assert not label.reason

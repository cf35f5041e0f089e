"""The labeller on the bundled real QEMU captures (realize-steps.md §1.4, §2)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.timeline.labels import label_messages
from vfioproxy.trace.timeline.model import REALIZE_STEPS, RESET_STEPS, STEP_ORDER, UNLABELLED, Label
from vfioproxy.trace.timeline.steps import STEP_INFO

from .realdata import TRACES

QEMU_CAPTURES = sorted(TRACES.glob("qemu-*.trace"))

#: realize-steps.md §1.4, per-step command counts (R1..R14, S1..S7)
COUNTS = {
    "qemu-realize-libvfio-user-server-001.trace":
        "1 2 1 7 1 1 1 4 2 0 0 1 2 1 | 1 2 0 1 2 6 5",
    "qemu-realize-gpio-001.trace": "1 2 1 6 1 1 1 4 1 0 0 1 2 1 | 1 2 0 1 2 6 5",
    "qemu-realize-qemu-server-e1000e-001.trace": "1 2 1 6 1 1 1 4 4 4 1 1 2 1 | 1 2 1 1 2 6 5",
    "qemu-realize-qemu-server-nvme-001.trace": "1 2 1 6 1 1 1 4 1 4 0 1 2 1 | 1 2 1 1 2 6 5",
}


def labelled(path: Path) -> list[tuple[DecodedMessage, Label]]:
    with TraceReader(path) as reader:
        return label_messages(
            item for item in decoded_records(reader) if isinstance(item, DecodedMessage))


def commands(pairs: list[tuple[DecodedMessage, Label]]) -> list[tuple[DecodedMessage, Label]]:
    return [(m, label) for m, label in pairs
            if m.record.direction is Direction.C2S and not m.observation.message.is_reply]


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

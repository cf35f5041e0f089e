"""The realize client knows its step, and the timeline labeller agrees with it.

The client notes the realize-steps.md step of every command it sends
(:attr:`RealizeResult.steps`). Against the real QEMU captures (answered by
:class:`tests.test_peer_client.CaptureServer`) its per-step counts are
realize-steps.md §1.4's, and since its stream is QEMU's byte for byte, the
labeller run on the capture must find the client's steps. Recorded through a
real ``record`` proxy against the reference device server (with and without
the machine reset, INTx and MSI-X, with and without the ROM probe, two
devices sharing one msg_id counter, a guest-triggered second reset), the
labeller must agree with the client on every message of every session.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from recorder.reader import TraceReader
from tests.conftest import FD_HYGIENE
from tests.realdata import TRACES
from tests.test_cli_live import VFIOPROXY, spawn, wait_for_socket  # noqa: F401 (fixture)
from tests.test_peer_client import (
    E1K,
    GPIO,
    LVU,
    NVME,
    CaptureServer,
    commands,
    reply_to,
    serving,
)
from tests.timeline_traces import Device, record_qemu_process, trace_sessions
from vfioproxy.io.fds import OwnedFd
from vfioproxy.peers import layout
from vfioproxy.peers.client import (
    RealizeClient,
    RealizeOptions,
    RealizeResult,
    StepMessage,
    open_realize_client,
    realize,
)
from vfioproxy.peers.server import DeviceOptions
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import Message
from vfioproxy.protocol.header import Command
from vfioproxy.protocol.pci import Region
from vfioproxy.protocol.steps import REALIZE_STEPS, RESET_STEPS, STEP_ORDER, UNLABELLED
from vfioproxy.side import Direction
from vfioproxy.trace.decoded import DecodedMessage, decoded_records
from vfioproxy.trace.timeline.labels import label_messages
from vfioproxy.trace.timeline.model import Label

pytestmark = FD_HYGIENE

E1K_BOOT = "qemu-boot-qemu-server-e1000e-001"

#: realize-steps.md §1.4: commands per step of R1..R14 and S1..S7
SECTION_1_4 = {
    LVU: ((1, 2, 1, 7, 1, 1, 1, 4, 2, 0, 0, 1, 2, 1), (1, 2, 0, 1, 2, 6, 5)),
    GPIO: ((1, 2, 1, 6, 1, 1, 1, 4, 1, 0, 0, 1, 2, 1), (1, 2, 0, 1, 2, 6, 5)),
    E1K: ((1, 2, 1, 6, 1, 1, 1, 4, 4, 4, 1, 1, 2, 1), (1, 2, 1, 1, 2, 6, 5)),
    NVME: ((1, 2, 1, 6, 1, 1, 1, 4, 1, 4, 0, 1, 2, 1), (1, 2, 1, 1, 2, 6, 5)),
}


def session_messages(trace: Path, session: int) -> list[DecodedMessage]:
    with TraceReader(trace) as reader:
        return [item for item in decoded_records(reader, session=session)
                if isinstance(item, DecodedMessage)]


def step_of(label: Label) -> tuple[str, str]:
    return label.step, label.substep


def disagreements(steps: tuple[StepMessage, ...], trace: Path, session: int) -> list[str]:
    """Where the labeller's label of a message differs from the client's step,
    one line each; also a message of the session the client did not send (or
    whose reply it did not get) and a command of the client missing in the trace."""
    labelled = label_messages(session_messages(trace, session))
    client = {step.msg_id: step for step in steps}
    problems: list[str] = []
    seen: set[tuple[bool, int]] = set()
    for item, label in labelled:
        header = item.observation.message.header
        key = (header.is_reply, header.msg_id)
        where = (f"seq {item.record.seq} {header.command_name} "
                 f"{'reply' if header.is_reply else 'cmd'} id={header.msg_id} {item.text[:50]!r}")
        want = client.get(header.msg_id)
        expected_direction = Direction.S2C if header.is_reply else Direction.C2S
        if want is None or item.record.direction is not expected_direction or key in seen:
            problems.append(f"{where}: not a message of the client's, labelled {label.text()}")
            continue
        seen.add(key)
        if step_of(label) != (want.step, want.substep):
            reason = f" ({label.reason})" if label.reason else ""
            problems.append(f"{where}: client {want.step} {want.substep}".rstrip()
                            + f", labeller {label.text()}{reason}")
    for step in steps:
        if (False, step.msg_id) not in seen:
            problems.append(f"client's {step.text()} is not in the trace")
        if not step.posted and (True, step.msg_id) not in seen:
            problems.append(f"the reply to the client's {step.text()} is not in the trace")
    return problems


def counts(steps: tuple[StepMessage, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    per_step = Counter(step.step for step in steps)
    return tuple(per_step[name] for name in names)


# ===================================================================== the client's own labels


async def run_capture(capture: str) -> RealizeResult:
    server = CaptureServer(capture)
    async with serving(server) as stream:
        result = await realize(stream, RealizeOptions())
    assert server.fallbacks == []
    return result


@pytest.mark.parametrize("capture", sorted(SECTION_1_4))
async def test_the_client_puts_qemus_commands_under_the_steps_of_section_1_4(capture: str) -> None:
    result = await run_capture(capture)
    realize_counts, reset_counts = SECTION_1_4[capture]
    assert counts(result.steps, REALIZE_STEPS) == realize_counts
    assert counts(result.steps, RESET_STEPS) == reset_counts
    assert len(result.steps) == sum(realize_counts) + sum(reset_counts)
    order = [STEP_ORDER.index(step.step) for step in result.steps]
    assert order == sorted(order), "steps come in realize-steps.md §1 order"
    assert [step.msg_id for step in result.steps] == list(range(len(result.steps)))
    assert result.to_json()["steps"][0] == {
        "msg_id": 0, "command": Command.VERSION, "step": "R1", "substep": "", "posted": False}


@pytest.mark.parametrize("capture", sorted(SECTION_1_4))
async def test_the_labeller_finds_the_clients_steps_in_qemus_own_capture(capture: str) -> None:
    """The client's stream is QEMU's byte for byte, so its i-th command is the
    capture's i-th: the labeller must put each under the client's step."""
    result = await run_capture(capture)
    trace = TRACES / f"{capture}.trace"
    (session,) = trace_sessions(trace)
    labelled = label_messages(session_messages(trace, session))
    commands = [(item, label) for item, label in labelled
                if item.record.direction is Direction.C2S and not item.observation.message.is_reply]
    assert len(commands) == len(result.steps)
    wrong = [f"{item.text[:60]!r}: client {step.step}, labeller {label.text()}"
             for (item, label), step in zip(commands, result.steps, strict=True)
             if label.step != step.step]
    assert wrong == []


def test_a_step_message_reads_as_id_command_and_step() -> None:
    assert StepMessage(12, Command.REGION_READ, "R7").text() == "#12 REGION_READ R7"
    assert StepMessage(90, Command.DEVICE_RESET, "guest-reset", "S4").text() == \
        "#90 DEVICE_RESET guest-reset S4"
    assert StepMessage(7, Command.REGION_WRITE, "bar-mmio-posted", posted=True).text() == \
        "#7 REGION_WRITE posted bar-mmio-posted"


async def test_the_rom_load_sends_what_qemu_sent_at_the_e1000e_boots_first_rom_read() -> None:
    server = CaptureServer(E1K_BOOT)
    async with serving(server) as stream:
        result = await realize(stream, RealizeOptions(rom_load=True))
    assert server.fallbacks == []
    *_, info, read = commands(server.seen)
    assert (info.command, info.body.index, info.body.argsz) == (Command.DEVICE_GET_REGION_INFO,
                                                                Region.ROM, 32)
    assert (read.command, read.body.region, read.body.offset, read.body.count) == (
        Command.REGION_READ, Region.ROM, 0, 0x40000)
    assert result.rom_loaded == 0x40000
    assert [(s.step, s.command) for s in result.steps[-2:]] == [
        ("rom-load", Command.DEVICE_GET_REGION_INFO), ("rom-load", Command.REGION_READ)]
    assert "ROM: 256 KiB, loaded 262144 bytes" in result.summary()


async def test_a_short_rom_reply_is_read_on_from_where_it_stopped_until_a_zero_byte_reply() -> None:
    def short(message: Message, recorded: bytes | None) -> list[tuple[bytes, list[OwnedFd]]] | None:
        body = message.body
        if message.command != Command.REGION_READ or body.region != Region.ROM:
            return None
        count = 0 if body.offset >= 0x30000 else 0x10000
        data = bytes([body.offset >> 16]) * count
        return [(reply_to(message, RegionAccessBody(body.offset, body.region, count,
                                                    data).serialize()), [])]

    server = CaptureServer(E1K_BOOT, short)
    async with serving(server) as stream, open_realize_client(stream) as client:
        await client.realize()
        rom = await client.load_rom()
        assert await client.load_rom() is rom, "loaded once"
    reads = [(m.body.offset, m.body.count) for m in commands(server.seen)
             if m.command == Command.REGION_READ and m.body.region == Region.ROM]
    assert reads == [(0, 0x40000), (0x10000, 0x30000), (0x20000, 0x20000), (0x30000, 0x10000)]
    assert rom == b"".join(bytes([i]) * 0x10000 for i in range(3))


async def test_without_a_rom_bar_the_rom_load_sends_nothing() -> None:
    server = CaptureServer(E1K_BOOT)
    options = RealizeOptions(rombar=False)
    async with serving(server) as stream, open_realize_client(stream, options) as client:
        await client.realize()
        sent = len(server.seen)
        assert await client.load_rom() is None
        assert len(server.seen) == sent


# ===================================================================== recorded sessions

CONFIGS = [
    pytest.param(RealizeOptions(workload=3, irq=irq, reset=reset, rombar=rombar, rom_load=True),
                 id=f"{irq}-{'' if reset else 'no-'}reset-{'' if rombar else 'no-'}rombar")
    for irq in ("intx", "msix")
    for reset in (True, False)
    for rombar in (True, False)
]


@pytest.mark.parametrize("options", CONFIGS)
async def test_the_labeller_agrees_with_the_client_on_every_recorded_message(
    tmp_path: Path, options: RealizeOptions
) -> None:
    run = await record_qemu_process(tmp_path / "one.trace", [Device(options)])
    (result,) = run.results
    steps = Counter(step.step for step in result.steps)
    assert steps["R8"] == (4 if options.rombar else 0)
    assert steps["rom-load"] == (2 if options.rombar else 0)  # RI(6), RD(6): only with a ROM BAR
    assert result.rom_loaded == (layout.ROM_SIZE if options.rombar else None)
    assert (steps["S4"] == 1) is options.reset
    assert steps["bar-mmio"] == 4 * options.workload  # DESC_LO, DESC_HI, DOORBELL, IRQ_STATUS
    assert steps["intx-eoi"] == (options.workload if options.irq == "intx" else 0)
    assert (steps["msix-enable"] > 0) is (options.irq == "msix")
    assert UNLABELLED not in steps
    assert disagreements(result.steps, run.trace, run.sessions[0]) == []


async def test_a_device_without_rom_is_probed_at_r8_and_never_loaded(tmp_path: Path) -> None:
    device = Device(RealizeOptions(workload=1, rom_load=True))
    run = await record_qemu_process(tmp_path / "norom.trace", [device],
                                    device_options=DeviceOptions(rom=False))
    (result,) = run.results
    steps = Counter(step.step for step in result.steps)
    assert (steps["R8"], steps["rom-load"], result.rom_size, result.rom_loaded) == (4, 0, 0, None)
    assert disagreements(result.steps, run.trace, run.sessions[0]) == []


async def test_two_devices_of_one_process_share_the_id_counter_and_label_apart(
    tmp_path: Path,
) -> None:
    devices = [Device(RealizeOptions(workload=2)),
               Device(RealizeOptions(workload=2, irq="msix", rombar=False))]
    run = await record_qemu_process(tmp_path / "two.trace", devices)
    first, second = (tuple(step.msg_id for step in r.steps) for r in run.results)
    assert sorted(first + second) == list(range(len(first) + len(second)))
    realized = sum(1 for step in run.results[0].steps if step.step in REALIZE_STEPS)
    assert first[realized] > first[realized - 1] + 1, "device 2's realize lies in the gap"
    assert second[0] == realized
    assert len(set(run.sessions)) == 2
    for result, session in zip(run.results, run.sessions, strict=True):
        assert disagreements(result.steps, run.trace, session) == []


async def test_a_guest_reset_after_the_workload_is_labelled_guest_reset_with_its_s_steps(
    tmp_path: Path,
) -> None:
    devices = [Device(RealizeOptions(workload=2), guest_reset=True),
               Device(RealizeOptions(workload=2, irq="msix"), guest_reset=True)]
    run = await record_qemu_process(tmp_path / "reset.trace", devices, first_id=0xFFE0)
    for result, session in zip(run.results, run.sessions, strict=True):
        again = [step for step in result.steps if step.step == "guest-reset"]
        machine = [step.step for step in result.steps if step.step in RESET_STEPS]
        assert [step.substep for step in again if step.substep != "S1"] == \
            [step for step in machine if step not in ("S1", "S7")]
        assert all(step.substep != "S7" for step in again), "the PAM layout did not change"
        after = [step.step for step in result.steps[result.steps.index(again[-1]):]]
        assert "bar-mmio" in after, "the workload ran again after the reset"
        assert disagreements(result.steps, run.trace, session) == []
    msix_reset = [step.substep for step in run.results[1].steps if step.step == "guest-reset"]
    assert msix_reset[:4] == ["S1", "S1", "S1", "S1"], "MSI-X off, INTx fallback, INTx off"


async def test_guest_bar_reads_pba_reads_and_io_bar_writes_are_labelled_alike(
    tmp_path: Path,
) -> None:
    async def guest(client: RealizeClient) -> None:
        await client.bar_read(layout.MSIX_BAR, layout.MSIX_PBA_OFFSET, 8)
        await client.bar_read(0, layout.REG_ID, 4)
        await client.bar_write(1, 0, bytes(4))

    device = Device(RealizeOptions(workload=1, irq="msix"), guest=guest)
    run = await record_qemu_process(tmp_path / "guest.trace", [device])
    (result,) = run.results
    assert [step.step for step in result.steps[-3:]] == ["pba-read", "bar-mmio", "bar-mmio"]
    assert disagreements(result.steps, run.trace, run.sessions[0]) == []


async def test_a_write_to_a_memory_bar_of_a_device_without_mmap_is_posted_and_labelled_so() -> None:
    server = CaptureServer(E1K_BOOT)
    async with serving(server) as stream, open_realize_client(stream) as client:
        await client.realize()
        await client.bar_write(0, 0, bytes(4))
        await client.bar_write(2, 0, bytes(4))  # E1K's BAR2 is an I/O BAR: waited
        steps = client.result().steps
    posted, waited = commands(server.seen)[-2:]
    assert posted.header.no_reply and not waited.header.no_reply
    assert [(s.msg_id, s.step, s.posted) for s in steps[-2:]] == [
        (posted.msg_id, "bar-mmio-posted", True), (waited.msg_id, "bar-mmio", False)]


async def test_a_disagreement_names_the_message_and_both_labels(tmp_path: Path) -> None:
    run = await record_qemu_process(tmp_path / "one.trace", [Device(RealizeOptions())])
    steps = list(run.results[0].steps)
    steps[3] = StepMessage(steps[3].msg_id, steps[3].command, "R5")
    problems = disagreements(tuple(steps[:-1]), run.trace, run.sessions[0])
    assert [p for p in problems if "DEVICE_GET_INFO" in p] == [
        f"seq {seq} DEVICE_GET_INFO {kind} id=3 {text!r}: client R5, labeller R3"
        for seq, kind, text in ((8, "cmd", "argsz 16"),
                                (9, "reply", "argsz 16 flags RESET|PCI regions 9 irqs 5"))
    ]
    assert sum("not a message of the client's" in p for p in problems) == 2  # last cmd + reply


def test_realize_verbose_lists_every_command_with_its_step_and_rom_load_reads_the_rom(
    tmp_path: Path, spawn  # noqa: F811
) -> None:
    sock = tmp_path / "dev.sock"
    wait_for_socket(sock, spawn("serve-device", "--socket", sock))
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(sock), "--workload", "1",
                             "--rom-load", "-v"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "steps: R1 1, R2 2, R3 1, R4 7, R5 1, R6 1, R7 1, R8 4, R9 3, R10 4, R11 1, R12 1, " \
        "R13 2, R14 1, S1 1, S2 2, S3 1, S4 1, S5 2, S6 6, S7 5, rom-load 2, bar-mmio 4, " \
        "intx-eoi 1, guest-config 1" in lines
    assert "ROM: 4 KiB, loaded 4096 bytes" in lines
    listed = [line for line in lines if line.startswith("#")]
    assert listed[0] == "#0 VERSION R1" and listed[34] == "#34 DEVICE_RESET S4"
    assert listed[48:50] == ["#48 DEVICE_GET_REGION_INFO rom-load", "#49 REGION_READ rom-load"]
    assert listed[-1] == "#55 DEVICE_SET_IRQS intx-eoi" and len(listed) == 56


def test_realize_of_a_device_served_without_rom_loads_none(tmp_path: Path, spawn) -> None:  # noqa: F811
    sock = tmp_path / "dev.sock"
    wait_for_socket(sock, spawn("serve-device", "--socket", sock, "--no-rom"))
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(sock), "--rom-load"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ROM: none" in result.stdout.splitlines()
    assert "R8 4," in result.stdout and "rom-load" not in result.stdout

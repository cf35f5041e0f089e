"""``--interpose-irqs`` with the reference peers: the reference client's
workload (one interrupt per doorbell, INTx or MSI-X) through a proxy that
stands in for every SET_IRQS eventfd. Every interrupt is recorded as an
``irq`` event and still reaches the client (the workload waits for each);
SET_IRQS that re-point or disable vectors swap or release them; no fd leaks;
irq rules drop or delay interrupts. Real sockets, real eventfds, real time
(the watcher is a thread)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import trio

from recorder.reader import TraceReader
from recorder.records import EventRecord
from recorder.sink import TraceSink
from tests.conftest import FD_HYGIENE
from vfioproxy.inject import Injector
from vfioproxy.interpose import InterposeOptions
from vfioproxy.peers.client import RealizeError, RealizeOptions, RealizeResult, realize
from vfioproxy.peers.server import open_device_server
from vfioproxy.proxy import ProxyOptions, open_proxy
from vfioproxy.trace.decoded import decoded_records
from vfioproxy.trace.show import text_lines
from vfioproxy.trace.stats import collect

pytestmark = FD_HYGIENE

IRQS = ProxyOptions(interpose=InterposeOptions(interpose_irqs=True))


def events(path: os.PathLike[str], kind: str) -> list[EventRecord]:
    with TraceReader(path) as reader:
        return [r for r in reader if isinstance(r, EventRecord) and r.kind == kind]


async def run(tmp_path, options: ProxyOptions, realize_options: RealizeOptions,
              injector: Injector | None = None, trace: str = "t.trace"):
    sink = TraceSink(tmp_path / trace)
    async with (
        open_device_server(tmp_path / "dev.sock"),
        open_proxy(tmp_path / "p.sock", tmp_path / "dev.sock", sink=sink, options=options,
                   injector=injector),
    ):
        with trio.fail_after(30):
            try:
                result: RealizeResult | RealizeError = await realize(tmp_path / "p.sock",
                                                                     realize_options)
            except RealizeError as exc:
                result = exc
    sink.close()
    return result


@pytest.mark.parametrize("threads", [True, False], ids=["threads", "trio"])
@pytest.mark.parametrize("irq", ["intx", "msix"])
async def test_every_interrupt_is_recorded_and_reaches_the_client(tmp_path, irq, threads):
    options = ProxyOptions(threads=threads, interpose=IRQS.interpose)
    plain = await run(tmp_path, ProxyOptions(threads=threads),
                      RealizeOptions(workload=6, irq=irq), trace="plain.trace")
    result = await run(tmp_path, options, RealizeOptions(workload=6, irq=irq))
    # the client got every interrupt: each doorbell waits for one
    assert result.workload is not None and result.workload.doorbells == 6
    assert plain.workload is not None and plain.workload.doorbells == 6
    assert not events(tmp_path / "plain.trace", "irq")
    irqs = events(tmp_path / "t.trace", "irq")
    per_vector = Counter((e.data["index"], e.data["vector"]) for e in irqs)
    index = 0 if irq == "intx" else 2
    assert per_vector == {(index, 0): 6}
    assert all(e.data["count"] == 1 and e.data["fate"] == "signalled" for e in irqs)
    assert all(e.session == irqs[0].session for e in irqs)
    opened = events(tmp_path / "t.trace", "session_open")
    assert opened[0].data["interpose"] == {"interpose-irqs": True}
    # the SET_IRQS with eventfds are interposed, the disabling ones release
    notes = [e.data for e in events(tmp_path / "t.trace", "interpose")]
    assert all(n["mode"] == "interpose-irqs" for n in notes)
    interposed = [v for n in notes for v in n["note"].get("interposed", [])]
    released = [v for n in notes for v in n["note"].get("released", [])]
    assert "ERR[0]" in interposed and "INTX[0]" in interposed
    if irq == "msix":
        assert {"MSIX[0]", "MSIX[1]", "MSIX[2]", "MSIX[3]"} <= set(interposed)
        assert "INTX[0]" in released  # INTx off for MSI-X
    # trace show tells the interrupts
    with TraceReader(tmp_path / "t.trace") as reader:
        shown = [line for line in text_lines(decoded_records(list(reader)))
                 if " irq " in line]
    name = "INTX[0]" if irq == "intx" else "MSIX[0]"
    assert len(shown) == 6 and all(f"{name} count=1" in line for line in shown), shown
    # trace stats: per vector, timed from the doorbell (REGION_WRITE) just before
    with TraceReader(tmp_path / "t.trace") as reader:
        stats = collect(decoded_records(list(reader))).to_dict()
    (row,) = stats["irqs"]
    assert (row["vector"], row["events"], row["signals"], row["dropped"]) == (name, 6, 6, 0)
    assert row["per_second"] > 0
    assert row["after_region_write"]["count"] == 6
    assert 0 < row["after_region_write"]["p50_ns"] < 1e9


async def test_the_reset_after_msix_releases_what_it_disables(tmp_path):
    # realize, the machine reset (INTx off), the workload's probe: MSI-X on (its
    # vectors enabled one more at a time, each time after disabling them all:
    # NORESIZE); what is held when the session ends is closed with it (no fd leaks)
    result = await run(tmp_path, IRQS, RealizeOptions(workload=2, irq="msix", reset=True))
    assert not isinstance(result, RealizeError)
    held: set[str] = set()
    releases = 0
    for event in events(tmp_path / "t.trace", "interpose"):
        note = event.data["note"]
        for vector in note.get("released", []):
            assert vector in held
            held.remove(vector)
            releases += 1
        assert not set(note.get("interposed", [])) & held or "swapped" in note
        held |= set(note.get("interposed", []))
    assert held == {"ERR[0]", "MSIX[0]", "MSIX[1]", "MSIX[2]", "MSIX[3]"}
    # INTx at the reset and for MSI-X; MSI-X's 1, 2 and 3 vectors before 2, 3 and 4
    assert releases == 2 + 1 + 2 + 3


async def test_an_irq_rule_drops_an_interrupt_and_the_client_times_out(tmp_path):
    injector = Injector(["irq MSIX[0] index=1 drop"])
    failed = await run(tmp_path, IRQS,
                       RealizeOptions(workload=3, irq="msix", reply_timeout=0.5),
                       injector=injector)
    assert isinstance(failed, RealizeError)
    assert str(failed).startswith("W3 doorbell #1") and "no interrupt" in str(failed)
    irqs = events(tmp_path / "t.trace", "irq")
    assert [e.data["fate"] for e in irqs] == ["signalled", "dropped"]
    assert irqs[1].data["applied"][0]["action"] == "drop"
    assert injector.statistics().rule(1).applied == 1
    with TraceReader(tmp_path / "t.trace") as reader:
        shown = [line for line in text_lines(decoded_records(list(reader))) if " irq " in line]
    assert shown[1].endswith("irq MSIX[0] count=1 dropped: rule 1 drop")


async def test_an_irq_rule_delays_every_interrupt(tmp_path):
    injector = Injector(["irq * delay fixed(20ms)"])
    result = await run(tmp_path, IRQS, RealizeOptions(workload=3, irq="msix"),
                       injector=injector)
    assert result.workload is not None and result.workload.doorbells == 3
    assert result.timings.doorbell is not None and result.timings.doorbell.min >= 0.019
    irqs = events(tmp_path / "t.trace", "irq")
    assert [e.data["fate"] for e in irqs] == ["delayed"] * 3
    assert all(e.data["delay"] == pytest.approx(0.02, abs=1e-3) for e in irqs)
    with TraceReader(tmp_path / "t.trace") as reader:
        shown = [line for line in text_lines(decoded_records(list(reader))) if " irq " in line]
    assert shown[0].endswith(
        "irq MSIX[0] count=1 delayed 20000.0 us: rule 1 delay fixed(20ms) = 20000.0 us")

"""The ``interpose-irqs`` mode (sans-IO): which SET_IRQS fds it stands in for,
which vectors it releases, what it leaves alone."""

from __future__ import annotations

from vfioproxy.interpose import FdFate
from vfioproxy.interpose.irqs import InterposeIrqs
from vfioproxy.protocol.bodies import IrqSetBody
from vfioproxy.protocol.codec import build_command, build_reply, encode
from vfioproxy.protocol.constants import IrqIndex, IrqSetFlags
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction

C2S, S2C = Direction.C2S, Direction.S2C
TRIGGER = IrqSetFlags.ACTION_TRIGGER
EVENTFD, NONE, BOOL = IrqSetFlags.DATA_EVENTFD, IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL
MSIX, INTX = int(IrqIndex.MSIX), int(IrqIndex.INTX)


def set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    body = IrqSetBody(20 + len(data), int(flags), index, start, count, data)
    return encode(build_command(Command.DEVICE_SET_IRQS, 7, body))[0]


def test_each_fd_is_interposed_as_vector_start_plus_its_position() -> None:
    mode = InterposeIrqs()
    data = set_irqs(EVENTFD | TRIGGER, MSIX, 2, 3)
    done = mode.message(C2S, data, 3)
    assert done is not None
    assert done.data == data and done.mode == "interpose-irqs" and done.release == ()
    assert [p.fate for p in done.fds] == [FdFate.INTERPOSE] * 3
    assert [p.irq for p in done.fds] == [(MSIX, 2), (MSIX, 3), (MSIX, 4)]
    assert done.note == {"index": MSIX, "start": 2, "count": 3,
                         "interposed": ["MSIX[2]", "MSIX[3]", "MSIX[4]"]}
    assert mode.interposed == {(MSIX, 2), (MSIX, 3), (MSIX, 4)}


def test_new_fds_for_interposed_vectors_swap_them() -> None:
    # swapped, not released: the substitutes close the old fds when they take the new
    mode = InterposeIrqs()
    mode.message(C2S, set_irqs(EVENTFD | TRIGGER, MSIX, 0, 2), 2)
    done = mode.message(C2S, set_irqs(EVENTFD | TRIGGER, MSIX, 1, 2), 2)
    assert done is not None
    assert done.release == ()
    assert [p.irq for p in done.fds] == [(MSIX, 1), (MSIX, 2)]
    assert done.note["swapped"] == ["MSIX[1]"] and "released" not in done.note
    assert mode.interposed == {(MSIX, 0), (MSIX, 1), (MSIX, 2)}


def test_eventfd_with_no_fd_disables_its_range() -> None:
    # QEMU sends a run of -1 entries as DATA_EVENTFD with count N and no fd
    mode = InterposeIrqs()
    mode.message(C2S, set_irqs(EVENTFD | TRIGGER, MSIX, 0, 4), 4)
    done = mode.message(C2S, set_irqs(EVENTFD | TRIGGER, MSIX, 1, 2), 0)
    assert done is not None and done.fds == ()
    assert done.release == ((MSIX, 1), (MSIX, 2))
    assert mode.interposed == {(MSIX, 0), (MSIX, 3)}


def test_none_with_count_zero_disables_the_whole_index() -> None:
    mode = InterposeIrqs()
    mode.message(C2S, set_irqs(EVENTFD | TRIGGER, MSIX, 0, 2), 2)
    mode.message(C2S, set_irqs(EVENTFD | TRIGGER, INTX, 0, 1), 1)
    done = mode.message(C2S, set_irqs(NONE | TRIGGER, MSIX, 0, 0), 0)
    assert done is not None and done.release == ((MSIX, 0), (MSIX, 1))
    assert mode.interposed == {(INTX, 0)}
    # nothing left to release: the message is left alone
    assert mode.message(C2S, set_irqs(NONE | TRIGGER, MSIX, 0, 0), 0) is None


def test_what_it_leaves_alone() -> None:
    mode = InterposeIrqs()
    mode.message(C2S, set_irqs(EVENTFD | TRIGGER, MSIX, 0, 2), 2)
    before = set(mode.interposed)
    left_alone = [
        (set_irqs(NONE | TRIGGER, MSIX, 0, 1), 0),  # fires vector 0: not a disable
        (set_irqs(BOOL | TRIGGER, MSIX, 0, 2, b"\x01\x00"), 0),
        (set_irqs(NONE | IrqSetFlags.ACTION_MASK, MSIX, 0, 1), 0),
        (set_irqs(NONE | IrqSetFlags.ACTION_UNMASK, MSIX, 0, 1), 0),
        (set_irqs(EVENTFD | IrqSetFlags.ACTION_UNMASK, INTX, 0, 1), 1),  # resamplefd
        (set_irqs(EVENTFD | TRIGGER, MSIX, 0, 3), 2),  # fewer fds than vectors: bad input
        (set_irqs(EVENTFD | TRIGGER, MSIX, 0, 0)[:20], 0),  # a body that does not decode
        (set_irqs(EVENTFD | TRIGGER, MSIX, 0, 1), 1),  # wrong direction below
    ]
    for data, nfds in left_alone[:-1]:
        assert mode.message(C2S, data, nfds) is None, data.hex()
    assert mode.message(S2C, *left_alone[-1]) is None
    reply = encode(build_reply(build_command(Command.DEVICE_SET_IRQS, 7)))[0]
    assert mode.message(C2S, reply, 0) is None
    assert mode.message(C2S, b"\x01\x02", 0) is None
    assert mode.interposed == before


def test_vector_names() -> None:
    from vfioproxy.protocol.constants import irq_vector_name
    assert irq_vector_name(2, 5) == "MSIX[5]"
    assert irq_vector_name(0, 0) == "INTX[0]"
    assert irq_vector_name(9, 1) == "IRQ9[1]"
    assert irq_vector_name(2, None) == "MSIX"

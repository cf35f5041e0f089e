"""Guest memory of the realize client, and its answers to DMA_READ/DMA_WRITE.

Guest RAM is a memfd (sparse, 512 MiB by default, like QEMU's
``memory-backend-memfd share=on``) mapped into this process; the BIOS ROM
(``pc.bios``) and the legacy option-ROM area (``pc.rom``) are private memory
with no fd, as in QEMU. DMA windows (what DMA_MAP announced) map IOVA ranges
onto these backings; :meth:`GuestMemory.read` and :meth:`GuestMemory.write`
access memory by IOVA through the windows, and :meth:`GuestMemory.answer`
turns a server's DMA_READ/DMA_WRITE command into QEMU's reply
(protocol.md §2.11, §2.12, §4).
"""

from __future__ import annotations

import errno
import mmap

import attrs

from vfioproxy.errors import VfioProxyError
from vfioproxy.io.fds import OwnedFd, close_all, make_memfd
from vfioproxy.peers.layout import BIOS_IOVA, BIOS_SIZE, GUEST_RAM_SIZE
from vfioproxy.protocol.bodies import BodyContext, DmaAccessBody, DmaLayout
from vfioproxy.protocol.codec import Message, build_error_reply, build_reply
from vfioproxy.protocol.header import HEADER_SIZE, Command

__all__ = [
    "BIOS",
    "PC_ROM",
    "PC_ROM_IOVA",
    "PC_ROM_SIZE",
    "RAM",
    "DmaWindow",
    "GuestMemory",
    "MemoryAccessError",
    "realize_windows",
    "reset_windows",
]

#: backing names: guest RAM (the memfd) and the two fd-less ROMs
RAM = "ram"
BIOS = "pc.bios"
PC_ROM = "pc.rom"

#: q35's legacy areas while PAM routes them to ROM (after every machine reset)
PC_ROM_IOVA = 0xC0000
PC_ROM_SIZE = 0x20000
ISA_BIOS_IOVA = 0xE0000
ISA_BIOS_SIZE = 0x20000
LOW_RAM_END = 0x100000

#: QEMU's ``sizeof(VFIOUserDMARW)``: the smallest DMA command it accepts
DMA_COMMAND_MIN_SIZE = 32
_QEMU_READ_PADDING = bytes(4)


class MemoryAccessError(VfioProxyError):
    """A DMA access QEMU would refuse; ``errno`` is the error it replies with."""

    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = err


@attrs.frozen
class DmaWindow:
    """An IOVA range announced by DMA_MAP, backed by ``backing`` from ``offset``.

    ``has_fd`` says whether the DMA_MAP carries the backing's fd (only RAM
    has one); the DMA_MAP ``offset`` field is ``offset`` then, else 0.
    """

    iova: int
    size: int
    writable: bool
    backing: str
    offset: int = 0
    has_fd: bool = False

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def map_flags(self) -> int:
        """DMA_MAP flags: READ, plus WRITE unless read-only (QEMU: 0x3 or 0x1)."""
        return 0x3 if self.writable else 0x1

    @property
    def map_offset(self) -> int:
        return self.offset if self.has_fd else 0


def realize_windows(*, ram_fd: bool, ram_size: int = GUEST_RAM_SIZE) -> tuple[DmaWindow, ...]:
    """R2's DMA_MAP burst on q35: all of guest RAM, then the BIOS ROM at 4 GiB − 256 KiB."""
    return (
        DmaWindow(0, ram_size, True, RAM, 0, ram_fd),
        DmaWindow(BIOS_IOVA, BIOS_SIZE, False, BIOS, 0),
    )


def reset_windows(*, ram_fd: bool, ram_size: int = GUEST_RAM_SIZE) -> tuple[DmaWindow, ...]:
    """The q35 layout after a machine reset (S7): PAM puts ROM (no fd) over
    [0xc0000, 0x100000), RAM around it; the BIOS ROM stays.

    [0xc0000, 0xe0000) is ``pc.rom``; [0xe0000, 0x100000) is ``isa-bios``, an
    alias of the BIOS's last 128 KiB.
    """
    return (
        DmaWindow(0, PC_ROM_IOVA, True, RAM, 0, ram_fd),
        DmaWindow(PC_ROM_IOVA, PC_ROM_SIZE, False, PC_ROM, 0),
        DmaWindow(ISA_BIOS_IOVA, ISA_BIOS_SIZE, False, BIOS, BIOS_SIZE - ISA_BIOS_SIZE),
        DmaWindow(LOW_RAM_END, ram_size - LOW_RAM_END, True, RAM, LOW_RAM_END, ram_fd),
        realize_windows(ram_fd=ram_fd, ram_size=ram_size)[1],
    )


class GuestMemory:
    """Guest RAM (a memfd), the fd-less ROMs, and the DMA windows over them.

    :meth:`close` unmaps everything and closes the memfd, once; the object is
    unusable afterwards.
    """

    def __init__(self, ram_size: int = GUEST_RAM_SIZE) -> None:
        self.ram_size = ram_size
        self.ram_fd: OwnedFd = make_memfd("guest-ram", ram_size)
        self._backings: dict[str, mmap.mmap] = {}
        try:
            self._backings[RAM] = mmap.mmap(self.ram_fd.fileno(), ram_size)
            self._backings[BIOS] = mmap.mmap(-1, BIOS_SIZE)
            self._backings[PC_ROM] = mmap.mmap(-1, PC_ROM_SIZE)
        except BaseException:
            self.close()
            raise
        self._windows: list[DmaWindow] = []

    @property
    def windows(self) -> tuple[DmaWindow, ...]:
        """The mapped windows, by IOVA."""
        return tuple(self._windows)

    def map(self, window: DmaWindow) -> None:
        """Add a window (it must not overlap another, and must fit its backing)."""
        backing = self._backings[window.backing]
        if window.size <= 0 or window.offset + window.size > len(backing):
            raise ValueError(f"window {window} does not fit {window.backing}")
        for other in self._windows:
            if window.iova < other.end and other.iova < window.end:
                raise ValueError(f"window {window} overlaps {other}")
        self._windows.append(window)
        self._windows.sort(key=lambda w: w.iova)

    def unmap(self, iova: int, size: int) -> DmaWindow:
        """Remove the window that is exactly [iova, iova + size)."""
        for window in self._windows:
            if (window.iova, window.size) == (iova, size):
                self._windows.remove(window)
                return window
        raise ValueError(f"no window is exactly [{iova:#x}, {iova + size:#x})")

    def load_rom(self, backing: str, data: bytes, offset: int = 0) -> None:
        """Load ROM contents (the firmware image QEMU loads into ``pc.bios``)."""
        if backing == RAM:
            raise ValueError("guest RAM is not a ROM: use write_ram")
        rom = self._backings[backing]
        if offset < 0 or offset + len(data) > len(rom):
            raise ValueError(f"{len(data)} bytes at {offset:#x} do not fit {backing}")
        rom[offset : offset + len(data)] = data

    # ------------------------------------------------------------- CPU access

    def read_ram(self, gpa: int, count: int) -> bytes:
        """Read guest RAM as the CPU does (by guest-physical address, no windows)."""
        self._check_ram(gpa, count)
        return self._backings[RAM][gpa : gpa + count]

    def write_ram(self, gpa: int, data: bytes) -> None:
        """Write guest RAM as the CPU does (by guest-physical address, no windows)."""
        self._check_ram(gpa, len(data))
        self._backings[RAM][gpa : gpa + len(data)] = data

    def _check_ram(self, gpa: int, count: int) -> None:
        if gpa < 0 or count < 0 or gpa + count > self.ram_size:
            raise ValueError(f"[{gpa:#x}, {gpa + count:#x}) is outside guest RAM")

    # ------------------------------------------------------------- DMA access

    def read(self, iova: int, count: int) -> bytes:
        """Read through the windows; :class:`MemoryAccessError` EFAULT outside them."""
        return b"".join(
            backing[start : start + n] for backing, start, n in self._pieces(iova, count, False)
        )

    def write(self, iova: int, data: bytes) -> None:
        """Write through the windows; EFAULT outside them, EPERM into a read-only one.

        Nothing is written unless the whole range is writable.
        """
        pos = 0
        for backing, start, n in self._pieces(iova, len(data), True):
            backing[start : start + n] = data[pos : pos + n]
            pos += n

    def _pieces(self, iova: int, count: int, write: bool) -> list[tuple[mmap.mmap, int, int]]:
        """(backing, offset, length) for each window the range crosses, in order."""
        pieces = []
        addr, end = iova, iova + count
        while addr < end:
            window = next((w for w in self._windows if w.iova <= addr < w.end), None)
            if window is None:
                raise MemoryAccessError(errno.EFAULT, f"IOVA {addr:#x} is outside every DMA window")
            if write and not window.writable:
                raise MemoryAccessError(
                    errno.EPERM,
                    f"IOVA {addr:#x} is in read-only window [{window.iova:#x}, {window.end:#x})",
                )
            n = min(end, window.end) - addr
            pieces.append((self._backings[window.backing], window.offset + addr - window.iova, n))
            addr += n
        return pieces

    # ------------------------------------------------------------- server commands

    def answer(
        self, command: Message, *, layout: DmaLayout, max_data_xfer_size: int
    ) -> Message | None:
        """QEMU's answer to a server command (``vfio_user_pci_process_req``).

        ``command`` is read in the spec layout (address u64, count u64, data
        at payload offset 16), as libvfio-user and the reference server send
        it. Real QEMU 10.2 reads count as u32 and the data from offset 12, so
        it would misread a spec DMA_WRITE (protocol.md §2.12); this client
        reads it as the server sent it. The reply uses ``layout``: ``QEMU``
        (DMA_READ: address, count u32, data, 4 zero bytes; DMA_WRITE: header
        only) or ``SPEC`` (DMA_READ: address, count u64, data; DMA_WRITE: the
        16-byte address/count echo).

        Errors, as QEMU replies them: fds on the command → EINVAL (the fds are
        closed); a command other than DMA_READ/DMA_WRITE → ENOSYS; size below
        32 → EINVAL (also for a size too large to frame, which arrives as a
        header alone; QEMU would lose the stream there); a DMA_READ count above
        ``max_data_xfer_size`` (the server's) or a DMA_WRITE count above its
        data → E2BIG; an IOVA outside every window → EFAULT; a DMA_WRITE into a
        read-only window → EPERM.
        A successful no_reply command gets no answer (None); errors always do.
        """
        header = command.header
        if command.fds:
            close_all(command.fds)
            return build_error_reply(command, errno.EINVAL)
        if header.command not in (Command.DMA_READ, Command.DMA_WRITE):
            return build_error_reply(command, errno.ENOSYS)
        payload = command.body.serialize()
        if header.size < DMA_COMMAND_MIN_SIZE or header.size != HEADER_SIZE + len(payload):
            return build_error_reply(command, errno.EINVAL)
        body = DmaAccessBody.parse(payload, BodyContext(DmaLayout.SPEC))
        reply_body: DmaAccessBody | None
        try:
            if header.command == Command.DMA_READ:
                if body.count > max_data_xfer_size:
                    return build_error_reply(command, errno.E2BIG)
                data = self.read(body.address, body.count)
                reply_body = DmaAccessBody(
                    body.address,
                    body.count,
                    data,
                    _QEMU_READ_PADDING if layout is DmaLayout.QEMU else b"",
                    layout,
                )
            else:
                if body.count > header.size - DMA_COMMAND_MIN_SIZE:
                    return build_error_reply(command, errno.E2BIG)
                self.write(body.address, body.data)
                reply_body = (
                    None
                    if layout is DmaLayout.QEMU
                    else DmaAccessBody(body.address, body.count, layout=DmaLayout.SPEC)
                )
        except MemoryAccessError as exc:
            return build_error_reply(command, exc.errno)
        if header.no_reply:
            return None
        return build_reply(command, reply_body)

    # ------------------------------------------------------------- closing

    def close(self) -> None:
        """Unmap the backings and close the RAM memfd; idempotent."""
        backings, self._backings = self._backings, {}
        for backing in backings.values():
            backing.close()
        self._windows = []
        self.ram_fd.close()

"""What each step of the realize timeline is, and the QEMU function behind it.

One entry per name of :data:`~vfioproxy.trace.timeline.model.STEP_ORDER`, from
``realize-steps.md`` (§1.1 realize, §1.4 machine reset, §2.1 the running guest).
Function paths are QEMU 10.2's; ``pci.c`` is ``hw/vfio/pci.c``.
"""

from __future__ import annotations

import attrs

from vfioproxy.trace.timeline.model import STEP_ORDER

__all__ = ["STEP_INFO", "StepInfo"]


@attrs.frozen
class StepInfo:
    """A step's short ``name`` (``config copy``) and the QEMU ``function`` that sends it."""

    name: str
    function: str


_INFO = {
    "R1": ("version", "hw/vfio-user/proxy.c:vfio_user_validate_version"),
    "R2": ("DMA listener replay", "hw/vfio-user/container.c:vfio_user_dma_map"),
    "R3": ("device info", "hw/vfio-user/device.c:vfio_user_get_device_info"),
    "R4": ("BAR region info", "hw/vfio/device.c:vfio_device_get_region_info"),
    "R5": ("config region info", "pci.c:vfio_pci_populate_device"),
    "R6": ("ERR IRQ info", "pci.c:vfio_pci_populate_device"),
    "R7": ("config copy", "pci.c:vfio_pci_config_setup"),
    "R8": ("ROM size probe", "pci.c:vfio_pci_size_rom"),
    "R9": ("BAR type", "pci.c:vfio_bar_prepare"),
    "R10": ("MSI-X early setup", "pci.c:vfio_msix_early_setup"),
    "R11": ("MSI setup", "pci.c:vfio_msi_setup"),
    "R12": ("INTx pin probe", "pci.c:vfio_pci_interrupt_setup"),
    "R13": ("INTx enable", "pci.c:vfio_intx_enable"),
    "R14": ("ERR notifier", "pci.c:vfio_pci_register_err_notifier"),
    "S1": ("interrupts off", "pci.c:vfio_disable_interrupts"),
    "S2": ("quiesce command register", "pci.c:vfio_pci_pre_reset"),
    "S3": ("force D0", "pci.c:vfio_pci_pre_reset"),
    "S4": ("reset", "hw/vfio-user/device.c:vfio_user_device_reset"),
    "S5": ("INTx back on", "pci.c:vfio_pci_post_reset"),
    "S6": ("clear BARs", "pci.c:vfio_pci_post_reset"),
    "S7": ("q35 PAM re-layout", "hw/pci-host/q35.c:mch_reset"),
    "rom-load": ("ROM load", "pci.c:vfio_pci_load_rom"),
    "bar-mmio": ("BAR MMIO", "hw/vfio/region.c:vfio_region_read/vfio_region_write"),
    "bar-mmio-posted": (
        "BAR MMIO, posted", "hw/vfio-user/device.c:vfio_user_device_io_region_write"
    ),
    "pba-read": ("MSI-X PBA read", "hw/vfio-user/pci.c:vfio_user_pba_read"),
    "intx-eoi": ("INTx EOI (unmask)", "pci.c:vfio_pci_intx_eoi"),
    "guest-config": ("guest config access", "pci.c:vfio_pci_read_config/vfio_pci_write_config"),
    "guest-memory-map": (
        "guest memory-map change", "hw/vfio/listener.c:vfio_listener_region_add/del"
    ),
    "msi-enable": ("MSI enable/disable", "pci.c:vfio_msi_enable/vfio_msi_disable"),
    "msix-enable": ("MSI-X enable/disable", "pci.c:vfio_msix_enable/vfio_msix_disable"),
    "guest-reset": ("guest-triggered reset", "hw/vfio-user/pci.c:vfio_user_pci_reset"),
    "device-dma": ("the device's own DMA", "the server's DMA_READ/DMA_WRITE"),
    "unlabelled": ("no rule matched", ""),
}

#: every step name of ``STEP_ORDER`` -> its :class:`StepInfo`
STEP_INFO: dict[str, StepInfo] = {step: StepInfo(*_INFO[step]) for step in STEP_ORDER}

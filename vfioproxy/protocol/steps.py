"""The names of QEMU's realize, reset and running steps (design/realize-steps.md).

One place for the step names that both the realize client
(:mod:`vfioproxy.peers.client`, which knows the step it is in) and the trace
labeller (:mod:`vfioproxy.trace.timeline`, which recognises it from the
wire) use: ``R1``..``R14`` (realize, §1.1), ``S1``..``S7`` (the machine reset,
§1.4) and the running-phase categories (§2.1).
"""

from __future__ import annotations

__all__ = ["REALIZE_STEPS", "RESET_STEPS", "RUNNING_STEPS", "STEP_ORDER", "UNLABELLED"]

#: realize steps, in QEMU's order (realize-steps.md §1.1)
REALIZE_STEPS = tuple(f"R{i}" for i in range(1, 15))
#: machine-reset steps (realize-steps.md §1.4)
RESET_STEPS = tuple(f"S{i}" for i in range(1, 8))
#: what the running guest causes (realize-steps.md §2.1)
RUNNING_STEPS = (
    "rom-load", "bar-mmio", "bar-mmio-posted", "pba-read", "intx-eoi", "guest-config",
    "guest-memory-map", "msi-enable", "msix-enable", "guest-reset", "device-dma",
)
#: a message no rule recognised (its label's ``reason`` says why)
UNLABELLED = "unlabelled"
#: every step in display order
STEP_ORDER = (*REALIZE_STEPS, *RESET_STEPS, *RUNNING_STEPS, UNLABELLED)

"""The realize timeline: every message of a client session labelled with the
QEMU step that sent it (``realize-steps.md``), and per-step times."""

from vfioproxy.trace.timeline.model import (
    REALIZE_STEPS,
    RESET_STEPS,
    RUNNING_STEPS,
    STEP_ORDER,
    UNLABELLED,
    Label,
    LabelledMessage,
    SessionTimeline,
    StepTimes,
)

__all__ = [
    "REALIZE_STEPS",
    "RESET_STEPS",
    "RUNNING_STEPS",
    "STEP_ORDER",
    "UNLABELLED",
    "Label",
    "LabelledMessage",
    "SessionTimeline",
    "StepTimes",
]

"""Trainer callbacks of tl_plugin."""

from .base import TLCallback, attach, bind_all, check_no_conflicts
from .history import TrainingHistoryCallback
from .lr import LayerwiseLRDecayCallback
from .phases import PhasedCallback
from .schedules import (
    FreezeSchedule,
    FreezeScheduleCallback,
    GradualUnfreezingCallback,
    LinearProbeThenFineTuneCallback,
    Phase,
    Plateau,
)
from .transfer import TransferCallback

__all__ = [
    "FreezeSchedule",
    "FreezeScheduleCallback",
    "GradualUnfreezingCallback",
    "LayerwiseLRDecayCallback",
    "LinearProbeThenFineTuneCallback",
    "Phase",
    "PhasedCallback",
    "Plateau",
    "TLCallback",
    "TrainingHistoryCallback",
    "TransferCallback",
    "attach",
    "bind_all",
    "check_no_conflicts",
]

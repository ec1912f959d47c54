"""Freeze schedules as data: the file format (`Phase`, `Plateau`, `FreezeSchedule`, YAML I/O) and the builders
that produce a schedule's phases for a model's layer groups (`GradualUnfreezing`, `LinearProbeThenFineTune`,
`TransferPlan`, `FixedSchedule`). Nothing here imports a `Trainer`; `tl_plugin.callbacks.phases` runs schedules.
"""

from .builders import FixedSchedule, GradualUnfreezing, LinearProbeThenFineTune, ScheduleBuilder, TransferPlan
from .format import ALL_GROUPS, FreezeSchedule, Phase, Plateau

__all__ = [
    "ALL_GROUPS",
    "FixedSchedule",
    "FreezeSchedule",
    "GradualUnfreezing",
    "LinearProbeThenFineTune",
    "Phase",
    "Plateau",
    "ScheduleBuilder",
    "TransferPlan",
]

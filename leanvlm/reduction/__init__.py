"""Visual-token reduction: the schedule, scoring, selection (pure torch, shape-static)."""

from leanvlm.reduction.schedule import FastVStage, Schedule

__all__ = ["FastVStage", "Schedule"]

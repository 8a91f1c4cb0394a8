"""Visual-token reduction: the schedule, scoring, selection (pure torch, shape-static)."""

from leanvlm.reduction.schedule import LLMStage, Schedule, VisionStage

__all__ = ["LLMStage", "Schedule", "VisionStage"]

"""The runtime: a Pipeline over an engine directory, with KV-cache management, batching and streaming."""

from leanvlm.runtime.pipeline import GenerationResult, Pipeline
from leanvlm.runtime.sampling import SamplingParams
from leanvlm.runtime.scheduler import Scheduler
from leanvlm.runtime.steps import StepRunner

__all__ = ["GenerationResult", "Pipeline", "SamplingParams", "Scheduler", "StepRunner"]

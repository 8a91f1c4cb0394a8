"""The runtime: a Pipeline over an engine directory, with KV-cache management, batching and streaming."""

from leanvlm.runtime.pipeline import GenerationResult, Pipeline
from leanvlm.runtime.sampling import SamplingParams

__all__ = ["GenerationResult", "Pipeline", "SamplingParams"]

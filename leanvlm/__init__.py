"""leanvlm: a deployment compiler for vision-language models with in-graph visual-token reduction."""

__version__ = "0.1.0"

__all__ = ["__version__"]

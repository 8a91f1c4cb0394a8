"""leanvlm: a deployment compiler for vision-language models with in-graph visual-token reduction."""

__version__ = "0.1.0"

__all__ = ["Pipeline", "GenerationResult", "__version__"]


def __getattr__(name: str):
    # Lazy: `import leanvlm` stays cheap for the CLI; the runtime pulls in onnxruntime and transformers.
    if name in ("Pipeline", "GenerationResult"):
        from leanvlm import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'leanvlm' has no attribute {name!r}")

"""Export a LLaVA checkpoint with its reduction schedule to four ONNX graphs plus a manifest."""

from leanvlm.export.engine import ExportOptions, ExportResult, export_engine

__all__ = ["ExportOptions", "ExportResult", "export_engine"]

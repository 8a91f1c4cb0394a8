"""Defaults shared by the CLI, the export options, the schedule presets and the runtime: written once here."""

OPSET = 18  # TensorRT 10.3 parses up to 20; opset 23 adds fused ops it rejects
FASTV_LAYER = 2  # FastV's K (its latency table): tokens dropped at the input of decoder layer 2
EXPORTER = "torchscript"
PRECISION = "fp32"
BACKEND = "onnxruntime"
MAX_BATCH = 8
MAX_NEW_TOKENS = 256  # sizes the KV cache at export
PROMPT_TEXT_TOKENS = 512  # default --max-prompt: image tokens + this many text tokens
GENERATE_MAX_NEW_TOKENS = 64  # a request's default, capped by the engine's limit
FLOPS_TEXT_TOKENS = 64  # prompt text around the image for FLOPs reports (LLaVA-1.5 prompts: ~60-70)
METHOD = "fastv"  # the reduction preset export-engine and plan use without --method
CALIB_N = 64  # --calib-n: calibration requests for int8 activation ranges

"""Exporting a Hugging Face checkpoint to a model directory: the only place torch is used.

``pipeline`` (``export()``, calibration, quantization, the manifest), ``graph_builder`` (our
ONNX graph) and ``kv_check`` (what the 4-bit KV cache costs a checkpoint).
"""

"""Exporting a Hugging Face checkpoint to a model directory: the only place torch is used.

``pipeline`` (``export()``: the options and the order of the steps), ``checkpoint`` (finding and
checking SRC; random checkpoints), ``gqa_export`` (our graph's export: KV-cache bits and
calibration), ``graph_builder`` and ``attention`` (our ONNX graph), ``optimum_export`` (the
reference export), ``manifest`` (manifest.json), ``calibrate`` and ``kv_check`` (the torch model
layer by layer; what the 4-bit KV cache costs a checkpoint), ``quantize``, ``source`` and
``onnx_writer`` (weights read, quantized and written one at a time).
"""

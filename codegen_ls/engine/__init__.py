"""The inference engine: a model directory in, tokens and log-probs out; no LSP.

``engine`` (``Engine``, the per-document prompt cache, sampling, tokenizer), ``backends`` (one
onnxruntime session per graph kind), ``kernels`` (the optional C decode-attention library, built
as ``codegen_ls.engine._decode_attention``) and ``modeldir`` (manifest, checksums, resolution).
Serving never imports torch.
"""

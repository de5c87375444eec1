"""The inference engine: a model directory in, tokens and log-probs out; no LSP.

``engine`` (``Engine``: loading, prefill with prompt reuse, batched decode, draft scoring),
``generation`` (``GenerateOptions``, candidates, statistics), ``prompt_cache`` (per-document KV
snapshots), ``sampling``, ``tokenizer``, ``fim``, ``backends`` (one onnxruntime session per graph
kind: ``gqa``, ``optimum``), ``kvcache`` (the 4-bit cache's format), ``kernels`` (the optional C
decode-attention library, built as ``codegen_ls.engine._decode_attention``), ``modeldir``
(manifest, checksums, resolution), ``remote`` (the same surface over an OpenAI-compatible
server) and ``latency``. Serving never imports torch.
"""

"""Text and cursor in, ranked suggestions out: no LSP, no onnxruntime.

``pipeline`` (``Completer.complete``, type-ahead), ``context`` (the prompt window in a token
budget, the completion mode), ``drafts`` (lookup drafts from documents, verified by the model),
``postprocess`` (stop rules, cleaning, indentation) and ``ranking`` (features, confidence).
"""

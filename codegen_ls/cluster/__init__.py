"""Team scale: our engine as a Ray Serve application (optional extra ``[cluster]``).

``protocol`` (OpenAI ``/v1/completions`` and llama.cpp ``/infill`` bodies, pure), ``service`` (one
replica's engine answering them, no Ray), ``router`` (session affinity: a document's requests go
to the replica holding its KV cache) and ``app`` (the Serve deployments, ``codegen-ls cluster
serve``). Only ``router`` and ``app`` import Ray.
"""

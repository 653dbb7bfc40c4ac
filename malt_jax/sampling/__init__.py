"""From prompts to samples: the G -> V -> R contexts of a task as tokens (``codec``), batched
jit-compiled decoding with a static KV cache (``decode``), and the in-graph, prefix-sharing
trajectory-expansion tree sampler (``expansion``).

Layer 4: may import ``model``, ``tasks``, ``parallel``, ``config``, ``roles`` and ``runtime``.
"""

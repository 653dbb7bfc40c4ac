"""Process-level helpers every layer may use: glibc malloc settings for XLA:CPU (``allocator``),
peak resident memory of a block of work (``rss``), TensorBoard event files (``tblog``), Orbax
checkpoints of array trees with JSON metadata (``checkpoint``), and the machine a figure was
measured on (``machine``).

Layer 0: imports nothing from malt_jax.
"""

"""What a user runs: the whole MALT pipeline (``pipeline.run``), the learning-curve study
(``study``), online multi-agent GRPO of the role adapters (``rl``: ``malt-jax rl``), iterative
MALT (``iterate``: several offline rounds, ``malt-jax iterate``), asking a
trained team (``ask``), exporting its adapters (``export``) and the JSON summary committed under
``results/`` (``summary``).

Layer 7: may import every lower layer; only ``malt_jax.cli`` and the public API import it.
"""

"""Credit assignment over the expansion tree: leaf rewards -> node values by value iteration
(``vmap``-ed mean over children), positive/negative labels, SFT indices and DPO sibling pairs
(``values``).

Layer 4: may import ``parallel``, ``config``, ``roles`` and ``runtime``.
"""

"""Training one role's LoRA adapter: token-level examples and packing (``data``), SFT / DPO losses
(``losses``), the optimizer and schedule (``optim``), the pure update steps (``steps``), their
compiled, sharded form (``stepper``), gradient-free scoring passes (``scoring``) and the driver
``train_role`` (``role``).

Layer 4: may import ``model``, ``parallel``, ``config``, ``roles`` and ``runtime``.
"""

"""Training one role's LoRA adapter: token-level examples and packing (``data``), SFT / DPO losses
(``losses``), the optimizer and schedule (``optim``), the pure update steps (``steps``), their
compiled, sharded form (``stepper``), gradient-free scoring passes (``scoring``) and the driver
``train_role`` (``role``); for online RL the clipped policy-gradient loss (``pg_loss``) and its
jitted update (``pg_step``).

Layer 4: may import ``model``, ``parallel``, ``config``, ``roles`` and ``runtime``.
"""

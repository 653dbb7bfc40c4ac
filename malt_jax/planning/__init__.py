"""Planning a run on a mesh without the hardware (``malt-jax plan``): analytic FLOP counts
(``flops``), ahead-of-time compiles from abstract shapes (``aot``), the per-device memory model
(``memory.make_plan``), the plan record with its table and refusal (``plan``) and the inputs it
parses (``units``).

Layer 5: may import ``training``, ``sampling``, ``model``, ``parallel``, ``config`` and ``runtime``.
"""

"""malt-jax: JAX-native MALT (Multi-Agent LLM Training)."""

__version__ = "0.1.0"

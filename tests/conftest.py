import os

# Fake 8 CPU devices so sharding is tested for real (must happen before jax is imported).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drops jit caches after each test module: the suite compiles hundreds of executables in one
    process, and keeping them all alive grows its memory until XLA fails (a segfault in compile was
    seen near the end of the suite with a second job on the machine)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()

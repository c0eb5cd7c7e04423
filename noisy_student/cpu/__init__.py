"""CPU-only machinery: the fast allocator and one XLA:CPU device per core, set up before jax starts."""

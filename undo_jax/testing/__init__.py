"""Test support, not part of the library: loopback teacher servers for tests and benchmarks
(`undo_jax.testing.servers`). Nothing in `undo_jax` imports it."""

"""Hand-written kernels XLA runs as FFI custom calls, each with XLA's own computation as fallback."""

"""Plain-PyTorch stand-ins for the GPU kernels and TE layers, so the model trains on CPU (docs/cpu_backend.md)."""

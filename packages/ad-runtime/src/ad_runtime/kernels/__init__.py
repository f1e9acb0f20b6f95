"""Custom kernels of ad_runtime (Triton); importing `ad_runtime.kernels.ops` registers their custom ops."""

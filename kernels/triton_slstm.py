"""Raw Triton kernels for the sLSTM sequence (forward and backward)."""

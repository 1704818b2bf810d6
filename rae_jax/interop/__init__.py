"""PyTorch / Hugging Face interop: name maps and file I/O. The only place NCHW appears."""

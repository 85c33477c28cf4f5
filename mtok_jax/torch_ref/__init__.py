"""PyTorch references of the audio branch (fbank, BEATs, embedder) for benchmarks and parity tests; needs torch."""

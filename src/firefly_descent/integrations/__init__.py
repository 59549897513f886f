"""Growth inside the training stacks people use: `integrations.lightning` (PyTorch Lightning callback) and
`integrations.hf` (transformers.Trainer callback). Each is imported on its own, so neither framework is
needed to use the other or the rest of the library (install the `[lightning]` or `[hf]` extra)."""

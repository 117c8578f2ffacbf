"""Inference engines: the model behind a small interface (load, warm up, run a batch)."""

"""Serving a trained model: `bloger recommend` (top-K items per user) and `bloger export-model` (a file or
a Hugging Face folder a serving box loads without the workspace)."""

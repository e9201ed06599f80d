"""bloger: generative recommendation with bi-level tokenizer/recommender optimisation (arXiv 2510.21242)."""

__version__ = "0.1.0"

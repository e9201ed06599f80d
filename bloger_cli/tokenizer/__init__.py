"""The item tokenizer: RQ-VAE (rqvae.py), k-means and residual k-means (kmeans.py), training
(trainer.py), semantic IDs with collisions and statistics (semantic_ids.py), reading its artifacts (io.py)."""

from bloger_cli.tokenizer.io import load_tokenizer
from bloger_cli.tokenizer.kmeans import RQKMeans, RQKMeansConfig
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig

__all__ = ["RQVAE", "RQVAEConfig", "RQKMeans", "RQKMeansConfig", "load_tokenizer"]

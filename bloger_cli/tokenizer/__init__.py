"""The item tokenizer: RQ-VAE (rqvae.py), k-means and residual k-means (kmeans.py), training
(trainer.py), semantic IDs with collisions and statistics (semantic_ids.py), the stage (stage.py)."""

from bloger_cli.tokenizer.kmeans import RQKMeans, RQKMeansConfig
from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
from bloger_cli.tokenizer.stage import load_tokenizer

__all__ = ["RQVAE", "RQVAEConfig", "RQKMeans", "RQKMeansConfig", "load_tokenizer"]

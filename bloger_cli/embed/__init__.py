"""`bloger embed`: item text -> sentence-transformers embeddings, or a precomputed matrix imported.

text.py (templates over the item text fields), encoder.py (model resolution, offline loading, batched
encoding), cache.py (vectors by text hash), matrix.py (`--from-file`), stage.py (the stage itself).
"""

from bloger_cli.embed.stage import run

__all__ = ["run"]

"""Item embeddings: text.py (templates over the item text fields), encoder.py (model resolution, offline
loading, batched encoding), cache.py (vectors by text hash), matrix.py (`--from-file`). The stage is
stages/embed.py.
"""

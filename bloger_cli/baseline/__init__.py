"""Discriminative baselines on the workspace split: SASRec (sasrec.py) and popularity (stage.py)."""

"""The generative recommender: a compact T5-style encoder-decoder over semantic-ID tokens, and decoding."""

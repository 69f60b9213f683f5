"""The decode loops: the model (transformers' generate), speculation and its drafts, sampling."""

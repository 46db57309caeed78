"""onspec: online speculative decoding (a lossless draft-then-verify engine whose draft learns online)."""

__version__ = "0.1.0"

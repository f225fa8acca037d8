"""handprop: character-level language models with every gradient written by hand."""

__version__ = "0.1.0"

"""genreflow: fine-tune PANNs (Cnn14) on GTZAN, one pipeline step at a time."""

__version__ = "0.1.0"

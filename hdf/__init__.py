"""HDF: the learning library (models, losses, data, loops, metrics). Never imports Flower."""

"""The Flower ClientApp: one site trains and evaluates HDF on its own source."""

"""The Keras models edgeq builds and exports: the Bayesian head, the grid detector, and what a model carries with it."""

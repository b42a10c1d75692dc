"""What edgeq train runs: the classifier and the detector trainers."""

"""Datasets for the host tools: class folders, Fashion-MNIST and MNIST, COCO sets, generated scenes and videos."""

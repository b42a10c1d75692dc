"""What edgeq eval runs: figures (scikit-learn where it has them), classification and detection evaluation, the HTML report."""

"""The stages of edgeq convert, one module each (see converter/pipeline.py)."""

"""data package (docstring written below)."""

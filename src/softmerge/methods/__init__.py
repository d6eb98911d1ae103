"""Merge methods users compare soft merging against."""

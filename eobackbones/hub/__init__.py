"""Weights: the manifest, downloads and checksums, converters and the conversion cache, model cards.

Below ``models`` in the layering: nothing here imports a model family.
"""

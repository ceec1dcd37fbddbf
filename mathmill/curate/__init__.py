"""Curation of problem sets: text normalization, near-duplicate clustering, decontamination."""

"""Labels for curated problems: the heuristic domain classifier, the Rasch
difficulty fit, quality filters and leakage-proof splits.
"""

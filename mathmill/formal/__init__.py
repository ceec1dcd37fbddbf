"""Formal proofs: lemmas extracted from Coq ``.v`` files (:mod:`.extract`) and their
proofs replayed through Coq with the goals before each tactic (:mod:`.replay`)."""

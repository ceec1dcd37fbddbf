"""Answer extraction and equivalence (math-verify + sympy). Filled by the grading issue."""

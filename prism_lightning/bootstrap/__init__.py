"""PRISM stages 1-3: queries, dual answers, self-verification (the bootstrapped corpus)."""

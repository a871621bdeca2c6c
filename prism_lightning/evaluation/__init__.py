"""Evaluation suites (MMLU, MT-Bench, safety refusal, preference), the baseline rows, Overall and the report."""

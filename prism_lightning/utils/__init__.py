"""Shared utilities with no model or training knowledge: errors, crash-safe JSONL, notices, progress, checks,
intervals, config paths and config errors."""

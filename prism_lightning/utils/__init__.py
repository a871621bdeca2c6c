"""Shared utilities with no model or training knowledge: errors, crash-safe JSONL, notices, progress, checks, statistics."""

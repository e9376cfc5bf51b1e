"""Metrics and figures: plain array code, no network and no workflow."""

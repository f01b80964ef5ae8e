"""Metrics (dataset-pooled confusion matrix), the `evaluate` stage, reports."""

"""Plumbing below the stage files: one topic per module."""

"""Runnable examples (``python -m examples.scrape``)."""

"""An app of the project; its tasks live in ``tasks.py`` (found by autodiscover)."""

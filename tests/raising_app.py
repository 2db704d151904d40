"""An app module that fails while being imported (for the CLI's error handling)."""

raise RuntimeError("broken at import time")

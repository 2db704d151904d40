"""The client side: :class:`~greenworker.client.app.App`, tasks, signatures and
results -- what a producer imports.  It imports the worker side only to build a
worker (``App.Worker()``) and to publish natively on Redis (see
``tests/test_layout.py``)."""

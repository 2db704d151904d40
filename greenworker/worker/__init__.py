"""The worker side: the :class:`~greenworker.worker.worker.Worker` and the components
it builds (handler, request, pool, timer, state, store, rate limits, autoscaler,
watchdog, signals, hooks)."""

"""What the worker shows of itself: task log lines, metrics, tracing."""

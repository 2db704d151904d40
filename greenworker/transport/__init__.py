"""The broker side: the consumer protocol, one reconnect loop, kombu's consumer, and the
native Redis consumer and publisher that keep kombu's key layout."""

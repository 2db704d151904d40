"""Talking with the cluster: the pidbox mailbox and its commands (``inspect``,
``control``), events, the heartbeat, gossip and mingle."""

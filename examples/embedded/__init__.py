"""A gevent (or eventlet) WSGI service that runs a greenworker worker in its own process."""

"""A TLS front in a process of its own:
``python -m tests.tlsproxy LISTEN_PORT UPSTREAM_PORT CERT KEY``.

Accepts TLS with the given server certificate and forwards the clear bytes to
127.0.0.1:UPSTREAM_PORT (the local RabbitMQ): to the client it is a broker that
speaks only TLS.  Plain threads: this process is never monkeypatched.
"""

from __future__ import annotations

import select
import socket
import ssl
import sys
import threading


def serve(context: ssl.SSLContext, client: socket.socket, upstream_port: int) -> None:
    try:
        secure = context.wrap_socket(client, server_side=True)
    except (OSError, ssl.SSLError):
        client.close()  # a client that does not trust us, or no TLS at all
        return
    try:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
    except OSError:
        secure.close()
        return
    # one thread per connection: an SSL object must not read and write in two threads
    try:
        while True:
            readable = (
                [secure] if secure.pending() else select.select([secure, upstream], [], [])[0]
            )
            if secure in readable:
                data = secure.recv(65536)
                if not data:
                    break
                upstream.sendall(data)
            if upstream in readable:
                data = upstream.recv(65536)
                if not data:
                    break
                secure.sendall(data)
    except OSError:
        pass
    finally:
        upstream.close()
        secure.close()


def main() -> None:
    listen_port, upstream_port, cert, key = sys.argv[1:5]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(listen_port)))
    listener.listen(128)
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=serve, args=(context, client, int(upstream_port)), daemon=True
        ).start()


if __name__ == "__main__":
    main()

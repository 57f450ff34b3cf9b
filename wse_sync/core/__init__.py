"""The pure core of wse_sync: bytes and calls in, events and bytes out.

Nothing here imports gevent or ZeroMQ, opens a socket or reads a clock:
the runtime modules beside this package do the I/O around it.
"""

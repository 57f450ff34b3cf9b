"""embed_app's mount served by the standard library's wsgiref (no gevent, no
WebSocket): for the misuse test. Prints ``port N`` once listening."""
import logging
import os
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from embed_app import application  # noqa: E402


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(levelname)s [%(name)s] %(message)s")
httpd = make_server("127.0.0.1", 0, application, handler_class=Quiet)
print("port", httpd.server_port, flush=True)
httpd.serve_forever()

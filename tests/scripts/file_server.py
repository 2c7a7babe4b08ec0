"""Serves a directory over HTTP for GET (a stand-in for the gateway's
`GET /v1/agent/...`); every other method, and missing files, get a JSON 404
as the gateway gives for a job it does not know.

usage: file_server.py IP PORT DIR
"""
import functools
import http.server
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    def not_found(self):
        body = b'{"error":"job is not registered with this gateway"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_DELETE = not_found

    def log_message(self, *args):
        pass


ip, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = http.server.ThreadingHTTPServer((ip, port), functools.partial(Handler, directory=root))
server.serve_forever()

"""Logs in to the gateway with a password, as a runner's agent does for its
tunnel (or as an attacker trying one on a person's username).

usage: tunnel_login.py HOST PORT USER PASSWORD

Prints one JSON line: the methods the gateway offers after "none", whether
the password was accepted, and the error if not.
"""
import json
import socket
import sys

import paramiko

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def transport():
    t = paramiko.Transport(socket.create_connection((host, port), timeout=20))
    t.start_client(timeout=20)
    return t


# Two connections: after a failed "none", paramiko asks for the userauth
# service again, which russh (like RFC 4252 allows) does not answer.
offered = []
t = transport()
try:
    t.auth_none(user)
except paramiko.BadAuthenticationType as e:
    offered = list(e.allowed_types)
except Exception as e:  # the gateway may close at once (an ended job)
    offered = ["<closed: %s>" % e]
t.close()
result = {"offered": offered, "accepted": False, "error": None}
t = transport()
try:
    t.auth_password(user, password)
    result["accepted"] = t.is_authenticated()
except Exception as e:
    result["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(result))
t.close()

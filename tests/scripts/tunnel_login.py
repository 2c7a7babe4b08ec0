"""Logs in to the gateway with a password, as a runner's agent does for its
tunnel (or as an attacker trying one on a person's username).

usage: tunnel_login.py HOST PORT USER PASSWORD [PROBE_HOST PROBE_PORT]

Prints one JSON line: the methods the gateway offers after "none", whether
the password was accepted, and the error if not. Logged in, with a probe
address, it also tries what an agent must never get from the gateway: a
session, a direct-tcpip channel to the probe address, a remote forward.
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


# Two connections: the methods offered after "none" on a fresh one, and the
# password on another, so each answer stands on its own.
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
if result["accepted"] and len(sys.argv) > 6:
    probe = (sys.argv[5], int(sys.argv[6]))
    got = {}
    for name, attempt in [
        ("session", lambda: t.open_session(timeout=10)),
        ("direct_tcpip", lambda: t.open_channel("direct-tcpip", probe, ("127.0.0.1", 4242), timeout=10)),
        ("remote_forward", lambda: t.request_port_forward("127.0.0.1", 0)),
    ]:
        try:
            attempt()
            got[name] = "opened"
        except Exception as e:
            got[name] = "refused: %s" % type(e).__name__
    result["probes"] = got
print(json.dumps(result))
t.close()

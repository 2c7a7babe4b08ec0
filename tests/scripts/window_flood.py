#!/usr/bin/env python3
"""A peer that ignores SSH flow control (tests/tests/abuse.rs).

Logs in to the gateway in jump mode, opens a direct-tcpip channel to
job-<id>:22 (a runner that never reads), then sends CHANNEL_DATA packets of
PACKET bytes straight to the transport, past the channel window, until the
gateway ends the connection or LIMIT bytes are sent. Prints one JSON line:
{"sent": bytes, "window": the window the gateway granted, "closed": bool}.
"""
import json
import sys
import time

from paramiko.common import cMSG_CHANNEL_DATA
from paramiko.message import Message

import jump_login

host, port, login, key_path, job, packet, limit = sys.argv[1:8]
port, packet, limit = int(port), int(packet), int(limit)

transport = jump_login.login(host, port, login, key_path)
chan = jump_login.open_to_job(transport, job)
window = chan.out_window_size
payload = b"x" * packet
sent = 0
closed = False
deadline = time.time() + 30
while sent < limit and time.time() < deadline:
    if not transport.is_active():
        closed = True
        break
    m = Message()
    m.add_byte(cMSG_CHANNEL_DATA)
    m.add_int(chan.remote_chanid)
    m.add_string(payload)
    try:
        transport._send_user_message(m)
    except Exception:
        closed = True
        break
    sent += packet
# The gateway may close just after the last packet: give it a moment.
for _ in range(50):
    if not transport.is_active():
        closed = True
        break
    time.sleep(0.1)
print(json.dumps({"sent": sent, "window": window, "closed": closed}))
transport.close()

#!/usr/bin/env python3
"""Channel requests while a write waits (tests/tests/abuse.rs).

Logs in to the gateway in jump mode, opens a direct-tcpip channel to
job-<id>:22 (a runner that never reads) and sends data within flow control
until the gateway stops giving window back. Then it sends COUNT `env`
requests without want_reply: they take no window, so only a count bounds
what the gateway keeps of them. Prints one JSON line: {"closed": whether the
gateway closed the channel within 20 s, "active": whether the connection is
still up}.
"""
import json
import sys
import time

from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

import jump_login

host, port, login, key_path, job, count = sys.argv[1:7]
port, count = int(port), int(count)

transport = jump_login.login(host, port, login, key_path)
chan = jump_login.open_to_job(transport, job)
jump_login.fill(chan)
for _ in range(count):
    if chan.closed:
        break
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("env")
    m.add_boolean(False)
    m.add_string("FLOOD")
    m.add_string("x" * 64)
    transport._send_user_message(m)
deadline = time.time() + 20
while time.time() < deadline and not chan.closed:
    time.sleep(0.1)
print(json.dumps({"closed": chan.closed, "active": transport.is_active()}))
transport.close()

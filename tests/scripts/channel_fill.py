#!/usr/bin/env python3
"""Many channels, each filled to its window (tests/tests/abuse.rs).

Logs in to the gateway in jump mode and opens up to COUNT direct-tcpip
channels to job-<id>:22 (a runner that never reads). Every byte is within flow
control: each is sent until the gateway stops giving window back because
the runner's socket buffers are full. Prints one JSON line: {"windows": [granted
per channel], "refused": {"code", "text"} of the first refused open or null,
"active": whether the connection is still up after it all, "after_close":
the window of a channel opened once all of them are closed (asked again for
up to 20 s, until it is a full one)}.
"""
import json
import socket
import sys
import time

import paramiko

host, port, login, key_path, job, count = sys.argv[1:7]
port, count = int(port), int(count)

key = paramiko.Ed25519Key.from_private_key_file(key_path)
sock = socket.create_connection((host, port), timeout=20)
transport = paramiko.Transport(sock)
transport.start_client(timeout=20)
transport.auth_publickey(login, key)
windows = []
refused = None
channels = []
for _ in range(count):
    try:
        chan = transport.open_channel(
            "direct-tcpip", (f"job-{job}", 22), ("127.0.0.1", 5555), timeout=20
        )
    except paramiko.ChannelException as e:
        refused = {"code": e.code, "text": e.text}
        break
    channels.append(chan)
    window = chan.out_window_size
    windows.append(window)
    # Send until the gateway stops giving window back (the runner's socket
    # buffers are full), at most 16 MiB: all within flow control.
    chan.settimeout(1.0)
    sent = 0
    payload = b"x" * 32768
    while sent < (16 << 20):
        try:
            sent += chan.send(payload)
        except socket.timeout:
            break
active = transport.is_active()
for chan in channels:
    chan.close()
after_close = None
deadline = time.time() + 20
while time.time() < deadline:
    try:
        chan = transport.open_channel(
            "direct-tcpip", (f"job-{job}", 22), ("127.0.0.1", 5555), timeout=20
        )
        after_close = chan.out_window_size
        chan.close()
        if after_close == windows[0]:
            break
    except paramiko.ChannelException:
        after_close = 0
    time.sleep(1)
print(json.dumps({"windows": windows, "refused": refused, "active": active, "after_close": after_close}))
transport.close()

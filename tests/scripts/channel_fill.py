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
import sys
import time

import paramiko

import jump_login

host, port, login, key_path, job, count = sys.argv[1:7]
port, count = int(port), int(count)

transport = jump_login.login(host, port, login, key_path)
windows = []
refused = None
channels = []
for _ in range(count):
    try:
        chan = jump_login.open_to_job(transport, job)
    except paramiko.ChannelException as e:
        refused = {"code": e.code, "text": e.text}
        break
    channels.append(chan)
    window = chan.out_window_size
    windows.append(window)
    # All within flow control, until the runner's buffers are full.
    jump_login.fill(chan)
active = transport.is_active()
for chan in channels:
    chan.close()
after_close = None
deadline = time.time() + 20
while time.time() < deadline:
    try:
        chan = jump_login.open_to_job(transport, job)
        after_close = chan.out_window_size
        chan.close()
        if after_close == windows[0]:
            break
    except paramiko.ChannelException:
        after_close = 0
    time.sleep(1)
print(json.dumps({"windows": windows, "refused": refused, "active": active, "after_close": after_close}))
transport.close()

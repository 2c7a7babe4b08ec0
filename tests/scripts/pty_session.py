"""A pty shell through the gateway as a person types it, with paramiko
(which can resize a pty without a terminal): turns echo off, types a
command whose text differs from its output, resizes the window to 120x40,
asks the size, exits 3. Prints {"out": base64 of stdout, "status": N}.

usage: pty_session.py HOST PORT USER KEY
"""
import base64
import json
import sys
import time

import paramiko

host, port, user, key = sys.argv[1:5]
client = paramiko.SSHClient()
client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
client.connect(
    host,
    port=int(port),
    username=user,
    key_filename=key,
    look_for_keys=False,
    allow_agent=False,
    timeout=20,
    banner_timeout=20,
    auth_timeout=20,
)
chan = client.get_transport().open_session()
chan.get_pty(term="xterm", width=80, height=24)
chan.invoke_shell()
out = b""


def until(marker):
    global out
    deadline = time.time() + 20
    while marker not in out:
        if time.time() > deadline:
            raise SystemExit("no %r in %r" % (marker, out))
        if chan.recv_ready():
            out += chan.recv(65536)
        else:
            time.sleep(0.01)


# The typed text (ech''o-off) differs from what the command prints.
chan.sendall(b"stty -echo; echo ech''o-off\n")
until(b"echo-off")
chan.sendall(b"echo typed-$((6*7)); printf 'caf\\303\\251\\n'\n")
until(b"typed-42")
chan.resize_pty(width=120, height=40)
chan.sendall(b"stty size\n")
until(b"40 120")
chan.sendall(b"exit 3\n")
while True:
    data = chan.recv(65536)
    if not data:
        break
    out += data
status = chan.recv_exit_status()
client.close()
print(json.dumps({"out": base64.b64encode(out).decode(), "status": status}))

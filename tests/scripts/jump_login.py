"""Shared by the paramiko scripts of tests/tests/abuse.rs: a jump-mode login
and the channels and sends they all use."""
import socket

import paramiko


def login(host, port, user, key_path):
    """A transport to the gateway, authenticated as `user` with the key."""
    key = paramiko.Ed25519Key.from_private_key_file(key_path)
    sock = socket.create_connection((host, int(port)), timeout=20)
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=20)
    transport.auth_publickey(user, key)
    return transport


def open_to_job(transport, job):
    """A direct-tcpip channel to job-<id>:22 (raises ChannelException)."""
    return transport.open_channel(
        "direct-tcpip", (f"job-{job}", 22), ("127.0.0.1", 5555), timeout=20
    )


def fill(chan, limit=16 << 20):
    """Sends within flow control until the gateway stops giving window back
    for a second (the runner's socket buffers are full), at most `limit`."""
    chan.settimeout(1.0)
    payload = b"x" * 32768
    sent = 0
    while sent < limit:
        try:
            sent += chan.send(payload)
        except socket.timeout:
            break
    return sent

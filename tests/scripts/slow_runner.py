"""A runner whose sshd answers its channel requests late (tests/tests/interop.rs).

paramiko as the server: one key may log in (the job's own key, runner_login
"key"), a `pty-req` is refused after SLOW seconds, `exec` is answered at
once and runs the command. paramiko answers requests in order from one
thread, so the refusal of the pty holds the exec's answer behind it, as a
busy sshd would.

Usage: slow_runner.py HOST HOST_KEY_FILE AUTHORIZED_KEYS_FILE SLOW
Prints the port it listens on, then serves until killed.
"""
import socket
import subprocess
import sys
import threading
import time

import paramiko


class Runner(paramiko.ServerInterface):
    def __init__(self, allowed_file, slow):
        self.allowed_file = allowed_file
        self.slow = slow
        self.command = None
        self.ready = threading.Event()

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        # The job's key line, as the registration returned it (options
        # first); read at each login: it is installed after the start.
        words = open(self.allowed_file).read().split()
        if key.get_base64() in words:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(self, *args):
        time.sleep(self.slow)
        return False

    def check_channel_exec_request(self, channel, command):
        self.command = command
        self.ready.set()
        return True


def serve(conn, host_key, allowed_file, slow):
    transport = paramiko.Transport(conn)
    transport.add_server_key(host_key)
    runner = Runner(allowed_file, slow)
    transport.start_server(server=runner)
    chan = transport.accept(30)
    if chan is None:
        return
    if not runner.ready.wait(30):
        chan.close()
        return
    done = subprocess.run(runner.command, shell=True, capture_output=True)
    chan.sendall(done.stdout)
    chan.sendall_stderr(done.stderr)
    chan.send_exit_status(done.returncode)
    chan.shutdown_write()
    chan.close()
    time.sleep(0.5)
    transport.close()


def main():
    import os
    if os.environ.get("SLOW_RUNNER_LOG"):
        paramiko.util.log_to_file(os.environ["SLOW_RUNNER_LOG"], level="DEBUG")
    host, key_file, pub_file, slow = sys.argv[1:5]
    host_key = paramiko.Ed25519Key.from_private_key_file(key_file)
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=serve, args=(conn, host_key, pub_file, float(slow)), daemon=True
        ).start()


main()

"""paramiko's SSHClient with two keys, the first one nobody allowed on the
job: it asks for the userauth service again before the second key, as
Fabric and Ansible's paramiko connection do. Runs `echo` in job mode.

usage: two_keys.py HOST PORT USER WRONG_KEY RIGHT_KEY
Prints the command's output, or the error.
"""
import sys

import paramiko

host, port, user, wrong, right = sys.argv[1:6]
client = paramiko.SSHClient()
client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
try:
    client.connect(
        host,
        port=int(port),
        username=user,
        key_filename=[wrong, right],
        look_for_keys=False,
        allow_agent=False,
        timeout=20,
        banner_timeout=20,
        auth_timeout=20,
    )
    _, out, _ = client.exec_command("echo second-key-in", timeout=20)
    print(out.read().decode().strip())
except Exception as e:
    print("error: %s: %s" % (type(e).__name__, e))
finally:
    client.close()

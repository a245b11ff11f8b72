#!/usr/bin/env python3
"""Two users chat through the compose stack's reverse proxy, for scripts/compose-test: a client
of the Privora protocol in the standard library alone (the stand-in images have no Python
packages, and this runs on the host).

    compose-chat.py offline PORT          # Bob logs in after Alice sent: an `offline` frame
    compose-chat.py across PORT PROJECT   # Alice and Bob on different backends: a live frame
"""
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request


def token(port, name):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/dev/token", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"})
    answer = json.load(urllib.request.urlopen(request, timeout=10))
    return answer["userId"], answer["token"]


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock


def send(sock, opcode, data):
    mask = os.urandom(4)
    n = len(data)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    sock.sendall(bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def send_json(sock, frame):
    send(sock, 1, json.dumps(frame).encode())


def exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def frame(sock):
    """The next text frame as JSON; answers pings on the way (they confirm delivery)."""
    while True:
        first, second = exactly(sock, 2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack(">H", exactly(sock, 2))[0]
        elif n == 127:
            n = struct.unpack(">Q", exactly(sock, 8))[0]
        payload = exactly(sock, n)
        opcode = first & 0x0F
        if opcode == 1:
            return json.loads(payload)
        if opcode == 9:
            send(sock, 0xA, payload)
        assert opcode != 8, "closed by the server"


def log_in(port, user_token):
    sock = connect(port)
    send_json(sock, {"type": "login", "token": user_token})
    assert frame(sock)["type"] == "history"
    assert frame(sock)["type"] == "contacts"
    return sock


def receive(sock, sender, text, types):
    """Reads until the message `text` from `sender` comes in a frame of one of `types`."""
    for _ in range(10):
        got = frame(sock)
        if got["type"] in types and got.get("message") == text:
            assert got["from"] == sender, got
            return got["type"]
    raise SystemExit(f"the message {text!r} never came")


def offline(port):
    alice, alice_token = token(port, "Alice Compose")
    bob, bob_token = token(port, "Bob Compose")
    a = log_in(port, alice_token)
    send_json(a, {"type": "message", "to": bob, "message": "hello through nginx"})
    # Bob logs in after the send; the message comes in his login burst (or live, if his login
    # overtook its commit).
    b = connect(port)
    send_json(b, {"type": "login", "token": bob_token})
    kind = receive(b, alice, "hello through nginx", ("offline", "message"))
    print(f"compose-test: {bob} got {alice}'s message as a {kind!r} frame", file=sys.stderr)


def across(port, project):
    backends = [f"{project}_backend_1", f"{project}_backend-2_1"]

    def logins(user):
        """How many times each backend has logged `user` in, from its log."""
        counts = []
        for container in backends:
            # The server logs to stderr, which `podman logs` gives back on its own stderr.
            log = subprocess.run(["podman", "logs", container], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True).stdout
            counts.append(sum(1 for line in log.splitlines() if "logged in" in line and user in line))
        return counts

    def log_in_where(user, user_token):
        """A logged-in connection of `user`, and the backend it landed on."""
        before = logins(user)
        sock = log_in(port, user_token)
        for _ in range(20):  # the log line may reach podman's log file a moment later
            after = logins(user)
            landed = [i for i in range(len(backends)) if after[i] > before[i]]
            if landed:
                assert len(landed) == 1, (before, after)
                return sock, landed[0]
            time.sleep(0.1)
        raise SystemExit(f"no backend logged {user} in: {before} -> {after}")

    alice, alice_token = token(port, "Alice Scaled")
    bob, bob_token = token(port, "Bob Scaled")
    a, alice_on = log_in_where(alice, alice_token)
    # nginx spreads connections over both backends: Bob reconnects until he is on the other.
    for _ in range(8):
        b, bob_on = log_in_where(bob, bob_token)
        if bob_on != alice_on:
            break
        b.close()
    else:
        raise SystemExit("every connection went to one backend: nginx sees only one")
    send_json(a, {"type": "message", "to": bob, "message": "hello across backends"})
    receive(b, alice, "hello across backends", ("message",))
    print(f"compose-test: {alice} on {backends[alice_on]} reached {bob} on {backends[bob_on]} live",
          file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["offline"] and len(sys.argv) == 3:
        offline(int(sys.argv[2]))
    elif sys.argv[1:2] == ["across"] and len(sys.argv) == 4:
        across(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(__doc__)

#!/usr/bin/env python3
"""A registry proxy on loopback that injects faults, for tests/registry_faults.rs.

Usage: fault_proxy.py UPSTREAM_HOST:PORT MODE COUNT [PATTERN [[HOST:]PORT]]
  MODE: drop (close without answering), stall (answer nothing, keep the connection),
        500 (answer 500), truncate (send half of the body, then close),
        slow (send the whole answer in 20 pieces over 6 seconds),
        corrupt (change the body's last byte, same length: a mirror serving bad content), pass
  COUNT: how many matching requests get the fault (-1: all); later ones pass through
  PATTERN: a substring of the request path that selects requests [/blobs/]
  [HOST:]PORT: where to listen [127.0.0.1, any free port]
Prints the port it listens on, then one line per request on stdout: `FAULT|PASS METHOD PATH`.
"""
import socket
import sys
import threading
import time

upstream_host, upstream_port = sys.argv[1].rsplit(":", 1)
mode, count = sys.argv[2], int(sys.argv[3])
pattern = sys.argv[4] if len(sys.argv) > 4 else "/blobs/"
listen = sys.argv[5] if len(sys.argv) > 5 else "0"
listen_host, _, listen_port = listen.rpartition(":")
listen_host, listen_port = listen_host or "127.0.0.1", int(listen_port)
lock = threading.Lock()
faults_left = [count]


def read_head(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), rest


def content_length(head):
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            return int(v.strip())
    return 0


def forward(head, body):
    """Send the request upstream with `Connection: close` and return the whole response."""
    lines = [l for l in head.split("\r\n") if not l.lower().startswith("connection:")]
    lines.append("Connection: close")
    up = socket.create_connection((upstream_host, int(upstream_port)))
    up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    response = b""
    while True:
        chunk = up.recv(1 << 20)
        if not chunk:
            break
        response += chunk
    up.close()
    return response


def take_fault(path):
    if pattern not in path:
        return False
    with lock:
        if faults_left[0] == 0:
            return False
        if faults_left[0] > 0:
            faults_left[0] -= 1
        return True


def serve(conn):
    try:
        while True:
            head, rest = read_head(conn)
            if head is None:
                return
            n = content_length(head)
            while len(rest) < n:
                rest += conn.recv(65536)
            method, path = head.split(" ")[0:2]
            fault = mode != "pass" and take_fault(path)
            with lock:
                sys.stdout.write(f"{'FAULT' if fault else 'PASS'} {method} {path}\n")
                sys.stdout.flush()
            if fault and mode == "drop":
                return
            if fault and mode == "stall":
                time.sleep(3600)
                return
            if fault and mode == "500":
                body = b"injected fault"
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))
                return
            response = forward(head, rest)
            if fault and mode == "truncate":
                head_end = response.find(b"\r\n\r\n") + 4
                body_len = len(response) - head_end
                conn.sendall(response[: head_end + body_len // 2])
                return
            head_end = response.find(b"\r\n\r\n") + 4
            if fault and mode == "corrupt" and len(response) > head_end:
                response = response[:-1] + bytes([response[-1] ^ 1])
            if fault and mode == "slow":
                piece = len(response) // 20 + 1
                for start in range(0, len(response), piece):
                    conn.sendall(response[start : start + piece])
                    time.sleep(0.3)
                return
            conn.sendall(response)
            return
    except OSError:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((listen_host, listen_port))
    server.listen(64)
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()

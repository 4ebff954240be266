#!/usr/bin/env python3
"""Hostile HTTP clients for tests/bench/hostile.sh: not run by hand.

Opens COUNT connections to HOST:PORT, all at once, and holds them:

  idle    connects and sends nothing;
  body    sends a request head announcing a 100000-byte body to PATH and
          never sends the body;
  reader  asks for PATH (a large NAR) with a tiny receive buffer, set before
          connecting, and never reads the answer.

It raises its own open-files limit to fit COUNT sockets. Every half second
it looks at each connection without reading from a reader one (MSG_PEEK),
and rewrites STATUS (JSON, replaced atomically) with what it knows: how many
connected, how many the server closed or reset, how many it answered. It
stops on SIGTERM or SIGINT, or by itself after --lifetime seconds.
"""

import argparse
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        hard = need  # root may raise its hard limit up to fs.nr_open
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["idle", "body", "reader"])
    parser.add_argument("count", type=int)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/local/nix-cache-info")
    parser.add_argument("--status", required=True)
    parser.add_argument("--rcvbuf", type=int, default=1024)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    started = time.monotonic()

    host = f"Host: {args.host}:{args.port}\r\n"
    payload = {
        "idle": b"",
        "body": f"GET {args.path} HTTP/1.1\r\n{host}Content-Length: 100000\r\n\r\n".encode(),
        "reader": f"GET {args.path} HTTP/1.1\r\n{host}\r\n".encode(),
    }[args.kind]

    status = {
        "kind": args.kind,
        "requested": args.count,
        "nofile": raise_nofile(args.count + 64),
        "phase": "connecting",
        "connected": 0,
        "failed": 0,  # connect or send failed, or no connection in time
        "open": 0,  # connected and neither closed nor reset by the server
        "closed": 0,  # the server closed (FIN) after we connected
        "reset": 0,  # the server reset after we connected
        "answered": 0,  # the server sent something
    }

    def write_status():
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, args.status)

    write_status()

    # Connect all at once, non-blocking, and wait for them up to the timeout.
    selector = selectors.DefaultSelector()
    pending = 0
    for _ in range(args.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if args.kind == "reader":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        err = s.connect_ex((args.host, args.port))
        if err in (0, errno.EINPROGRESS):
            selector.register(s, selectors.EVENT_WRITE)
            pending += 1
        else:
            status["failed"] += 1
            s.close()
    conns = []
    deadline = time.monotonic() + args.connect_timeout
    while pending and not stop and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            selector.unregister(s)
            pending -= 1
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                status["failed"] += 1
                s.close()
                continue
            try:
                if payload and s.send(payload) != len(payload):
                    raise OSError("short send")
            except OSError:
                status["failed"] += 1
                s.close()
                continue
            conns.append(s)
    for key in list(selector.get_map().values()):
        status["failed"] += 1
        selector.unregister(key.fileobj)
        key.fileobj.close()
    selector.close()
    status["connected"] = len(conns)
    status["open"] = len(conns)
    status["phase"] = "holding"
    write_status()

    # Hold. A reader socket is only peeked at, so its buffer stays full and
    # the server's writes stay blocked; the others are read, so a server's
    # answer (say a 408) and its closing the connection are both seen.
    answered = set()
    flags = socket.MSG_DONTWAIT | (socket.MSG_PEEK if args.kind == "reader" else 0)
    while not stop and time.monotonic() - started < args.lifetime:
        still = []
        for s in conns:
            try:
                data = s.recv(1 if args.kind == "reader" else 65536, flags)
            except BlockingIOError:
                still.append(s)
                continue
            except OSError:
                status["reset"] += 1
                s.close()
                continue
            if not data:
                status["closed"] += 1
                s.close()
                continue
            answered.add(s.fileno())
            still.append(s)
        conns = still
        status["open"] = len(conns)
        status["answered"] = len(answered)
        write_status()
        time.sleep(0.5)
    status["phase"] = "done"
    write_status()
    for s in conns:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

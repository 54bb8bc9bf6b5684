"""The harness's xDS client: grpcio (gRPC's C core, with its built-in xDS)
calling Greet/Morning in a loop on one channel, as a Python service would,
until its stdin closes. Prints one JSON line per call, with wall-clock
times the harness places on its own clock:

    {"start": unix, "end": unix, "ok": true, "from": "127.0.0.1:1234"}
    {"start": unix, "end": unix, "ok": false, "error": "UNAVAILABLE: ..."}

    GRPC_XDS_BOOTSTRAP=bootstrap.json python3 xds_load.py xds:///greet_service 2

The request and reply are encoded by hand (interop/grpcio/greet_calls.py).
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "interop", "grpcio"))

import grpc  # noqa: E402

from greet_calls import decode_from, encode_request  # noqa: E402


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[1])
    morning = channel.unary_unary("/Greet/Morning")
    deadline = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    n = 0
    while not stop.is_set():
        start = time.time()
        try:
            reply = morning(encode_request(f"xds-{n}"), timeout=deadline)
            line = {"start": start, "end": time.time(), "ok": True, "from": decode_from(reply)}
        except grpc.RpcError as e:
            line = {
                "start": start,
                "end": time.time(),
                "ok": False,
                "error": f"{e.code().name}: {e.details()}",
            }
        print(json.dumps(line), flush=True)
        n += 1
        time.sleep(0.01)


if __name__ == "__main__":
    main()

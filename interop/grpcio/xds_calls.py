"""A long-lived grpcio client (gRPC's C core, with its built-in xDS) that
calls Greet/Morning in batches on one channel, so a test can change the
registry between batches and watch the picking follow.

Reads commands on stdin, one a line, and answers each with one JSON line:

    calls N        -> {"ok": N, "errors": {code: N}, "from": {addr: N}, "first_error": "..."}
    until ADDR N   -> {"n": calls made, "at": unix time of the first reply from ADDR}
                      (or {"n": N, "at": null} when none came in N calls)
    quit

    GRPC_XDS_BOOTSTRAP=bootstrap.json python3 xds_calls.py xds:///greet_service

The request and reply are encoded by hand (two string fields), as in
greet_calls.py: no generated stubs.
"""
import json
import sys
import time

import grpc

from greet_calls import batch, decode_from, encode_request


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[1])
    morning = channel.unary_unary("/Greet/Morning")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "until":
            addr, limit, at, n = words[1], int(words[2]), None, 0
            while n < limit:
                n += 1
                try:
                    if decode_from(morning(encode_request("grpcio-xds"), timeout=5)) == addr:
                        at = time.time()
                        break
                except grpc.RpcError:
                    pass
            print(json.dumps({"n": n, "at": at}), flush=True)
        elif words[0] == "calls":
            print(json.dumps(batch(morning, int(words[1]), "grpcio-xds")), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)


if __name__ == "__main__":
    main()

"""Calls Greet/Morning through grpcio (gRPC's C core), as a Python service
would: no generated stubs, the request and reply encoded by hand (two string
fields), a target and load-balancing policy from the command line.

Prints one JSON object: {"ok": N, "errors": {code: N}, "from": {addr: N},
"first_error": "..."}.

    python3 greet_calls.py TARGET CALLS [LB_POLICY]
"""
import collections
import json
import sys

import grpc


def encode_request(name: str) -> bytes:
    raw = name.encode()
    return b"\x0a" + bytes([len(raw)]) + raw


def varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def decode_from(reply: bytes) -> str:
    """The `from` field (2) of GreetResponse."""
    i = 0
    while i < len(reply):
        key, i = varint(reply, i)
        length, i = varint(reply, i)
        if key >> 3 == 2:
            return reply[i : i + length].decode()
        i += length
    return ""


def batch(morning, calls: int, name: str) -> dict:
    """CALLS Morning calls one after another; every failure is counted by
    its code and the run goes on (xds_calls.py runs batches of these too)."""
    ok, errors, seen, first = 0, collections.Counter(), collections.Counter(), None
    for _ in range(calls):
        try:
            reply = morning(encode_request(name), timeout=5)
            ok += 1
            seen[decode_from(reply)] += 1
        except grpc.RpcError as e:
            errors[e.code().name] += 1
            first = first or f"{e.code().name}: {e.details()}"
    return {"ok": ok, "errors": errors, "from": seen, "first_error": first}


def main() -> None:
    target, calls = sys.argv[1], int(sys.argv[2])
    policy = sys.argv[3] if len(sys.argv) > 3 else "round_robin"
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", policy)])
    morning = channel.unary_unary("/Greet/Morning")
    print(json.dumps(batch(morning, calls, "grpcio")))


if __name__ == "__main__":
    main()

"""Counts the HTTP/2 frames each side of a cleartext gRPC connection sends.

A TCP proxy on 127.0.0.1:LISTEN forwarding to 127.0.0.1:UPSTREAM; every
half second it writes to OUT.json the frames seen per direction (c2s:
client to server, s2c: back) by type, and the reads it made per direction
(about the writes the sender made, batching aside), and the payload bytes
per direction by frame type (HEADERS bytes per call: how well each side's
HPACK encoder uses its dynamic table). Point a client at the
proxy (for the registry: a key whose value is the proxy's address), run a
known number of calls, divide. Used for docs/interop.md, "Frames and
writes per call" (issue 14, point 3).

Usage: python3 interop/h2frames.py LISTEN UPSTREAM OUT.json
"""
import asyncio, sys, json, collections
NAMES = {0:'DATA',1:'HEADERS',2:'PRIORITY',3:'RST_STREAM',4:'SETTINGS',5:'PUSH_PROMISE',6:'PING',7:'GOAWAY',8:'WINDOW_UPDATE',9:'CONTINUATION'}
counts = {'c2s': collections.Counter(), 's2c': collections.Counter()}
payload = {'c2s': collections.Counter(), 's2c': collections.Counter()}
writes = collections.Counter()
async def pump(r, w, d, preface):
    buf = b''
    need_preface = preface
    while True:
        data = await r.read(65536)
        if not data:
            break
        writes[d] += 1
        w.write(data)
        await w.drain()
        buf += data
        if need_preface:
            if len(buf) < 24: continue
            buf = buf[24:]; need_preface = False
        while len(buf) >= 9:
            ln = int.from_bytes(buf[0:3], 'big')
            if len(buf) < 9 + ln: break
            kind = NAMES.get(buf[3], str(buf[3]))
            counts[d][kind] += 1
            payload[d][kind] += ln
            buf = buf[9+ln:]
    w.close()
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection('127.0.0.1', int(sys.argv[2]))
    await asyncio.gather(pump(cr, sw, 'c2s', True), pump(sr, cw, 's2c', False), return_exceptions=True)
async def main():
    srv = await asyncio.start_server(handle, '127.0.0.1', int(sys.argv[1]))
    async with srv:
        while True:
            await asyncio.sleep(0.5)
            with open(sys.argv[3], 'w') as f:
                json.dump({'frames': {k: dict(v) for k, v in counts.items()},
                           'payload_bytes': {k: dict(v) for k, v in payload.items()},
                           'reads': dict(writes)}, f)
asyncio.run(main())

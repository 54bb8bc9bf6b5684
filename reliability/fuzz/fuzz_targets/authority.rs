//! Any bytes a client sends after the HTTP/2 preface, through greet-server's
//! authority layer (`greet-server/src/authority/rewriter.rs`, compiled as it
//! is), fed in chunks of a fuzzed size. A differential oracle, with an
//! independent HPACK decoder (httlib-hpack) for both sides:
//!
//! - frames other than header blocks go out byte for byte, in order (a
//!   PUSH_PROMISE, which carries a header block h2 decodes, only before
//!   any rewrite);
//! - each header block goes out either rewritten (its frames at most
//!   16384 bytes, same stream and END_STREAM, decoding to exactly the
//!   client's header list, `:authority` aside: the output's is valid or
//!   absent, and equal to the client's when the client's was valid), or as
//!   it came (then the layer has stepped aside: it must not have rewritten
//!   anything before, and everything after goes out untouched too), or not
//!   at all because the connection is closed (the layer's closing block, and
//!   nothing after it);
//! - rewriting starts only on a block whose `:authority` is invalid, and a
//!   block is rewritten only when the client's list is under h2's 16 KiB
//!   limit and decodes;
//! - the layer never holds more than a frame, a block and a chunk.

#![no_main]

#[path = "../../../greet-server/src/authority/rewriter.rs"]
#[allow(dead_code)]
mod rewriter;

use httlib_hpack::Decoder;
use libfuzzer_sys::fuzz_target;
use rewriter::{
    Mode, Rewriter, CONTINUATION, END_HEADERS, END_STREAM, HEADERS, MAX_FRAME, MAX_HEADER_LIST,
    PADDED, PREFACE, PRIORITY, PUSH_PROMISE, SIZE_UPDATE_OVER_LIMIT as CLOSE, TABLE_SIZE,
};

type List = Vec<(Vec<u8>, Vec<u8>)>;

/// One frame as it appears on the wire; `payload` may be cut short at the
/// end of input.
#[derive(Clone, Copy)]
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    len: usize,
    payload: &'a [u8],
    wire: &'a [u8],
}

impl Frame<'_> {
    fn complete(&self) -> bool {
        self.payload.len() == self.len
    }
}

/// Splits bytes into frames; the last may be partial (even its header).
fn frames(mut b: &[u8]) -> (Vec<Frame<'_>>, &[u8]) {
    let mut v = Vec::new();
    while b.len() >= 9 {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        let end = (9 + len).min(b.len());
        v.push(Frame {
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
            len,
            payload: &b[9..end],
            wire: &b[..end],
        });
        b = &b[end..];
    }
    (v, b)
}

/// The HPACK fragment of a HEADERS or CONTINUATION frame, padding and
/// priority removed; None when malformed.
fn fragment<'a>(f: &Frame<'a>) -> Option<&'a [u8]> {
    let mut p = f.payload;
    if f.kind == HEADERS {
        if f.flags & PADDED != 0 {
            let (&pad, rest) = p.split_first()?;
            p = &rest[..rest.len().checked_sub(usize::from(pad))?];
        }
        if f.flags & PRIORITY != 0 {
            p = p.get(5..)?;
        }
    }
    Some(p)
}

/// Decodes a block field by field, stopping at h2's header list limit:
/// Ok(None) when over it.
fn decode(d: &mut Decoder, block: &[u8]) -> Result<Option<List>, ()> {
    let mut buf = block.to_vec();
    let mut list = List::new();
    let mut size = 0;
    while !buf.is_empty() {
        let mut one = Vec::with_capacity(1);
        d.decode_exact(&mut buf, &mut one).map_err(|_| ())?;
        for (n, v, _) in one {
            size += n.len() + v.len() + 32;
            if size >= MAX_HEADER_LIST {
                return Ok(None);
            }
            list.push((n, v));
        }
    }
    Ok(Some(list))
}

fn authorities(list: &List) -> Vec<&[u8]> {
    list.iter()
        .filter(|(n, _)| n == b":authority")
        .map(|(_, v)| &v[..])
        .collect()
}

fn valid(a: &[u8]) -> bool {
    http::uri::Authority::try_from(a).is_ok()
}

fn without_authority(list: &List) -> List {
    list.iter()
        .filter(|(n, _)| n != b":authority")
        .cloned()
        .collect()
}

/// An input header block: its frames (consecutive, one stream), whether it
/// ended properly (END_HEADERS, all frames complete, nothing interleaved).
struct InBlock<'a> {
    frames: Vec<Frame<'a>>,
    whole: bool,
}

fn check(input: &[u8], out: &[u8], mode: Mode) {
    assert!(out.starts_with(PREFACE), "the preface goes first");
    let body = &input[PREFACE.len()..];
    let rest = &out[PREFACE.len()..];
    let (ins, in_tail) = frames(body);
    let (outs, out_tail) = frames(rest);
    let mut in_dec = Decoder::with_dynamic_size(TABLE_SIZE as u32);
    let mut out_dec = Decoder::with_dynamic_size(TABLE_SIZE as u32);
    let mut rewriting = false;
    let (mut i, mut o) = (0, 0);
    // Byte offsets of frame i / o within body / rest.
    let offset = |fs: &[Frame<'_>], k: usize| fs[..k].iter().map(|f| f.wire.len()).sum::<usize>();
    while i < ins.len() {
        let f = &ins[i];
        let out_at = &rest[offset(&outs, o)..];
        let in_at = &body[offset(&ins, i)..];
        if !rewriting && out_at == in_at {
            // Stepped aside: everything from here as it came.
            return;
        }
        if outs
            .get(o)
            .is_some_and(|g| g.kind == HEADERS && g.payload == CLOSE)
        {
            assert_eq!(o + 1, outs.len(), "nothing after the closing block");
            assert!(out_tail.is_empty());
            assert_eq!(mode, Mode::Closed);
            assert!(
                rewriting,
                "closed only once rewriting; deciding, it steps aside"
            );
            return;
        }
        if f.kind == PUSH_PROMISE {
            panic!("a PUSH_PROMISE went on after a rewrite");
        }
        if f.kind != HEADERS && f.kind != CONTINUATION {
            let g = outs.get(o).expect("a frame the client sent is missing");
            assert_eq!(
                g.wire, f.wire,
                "frames other than headers go out as they came"
            );
            i += 1;
            o += 1;
            continue;
        }
        // A header block starting at i.
        let mut block = InBlock {
            frames: vec![],
            whole: false,
        };
        let stream = f.stream;
        let mut k = i;
        while k < ins.len() {
            let g = &ins[k];
            let first = k == i;
            let fits = if first {
                g.kind == HEADERS
            } else {
                g.kind == CONTINUATION && g.stream == stream
            };
            if !fits {
                break;
            }
            block.frames.push(*g);
            k += 1;
            if !g.complete() {
                break;
            }
            if g.flags & END_HEADERS != 0 {
                block.whole = true;
                break;
            }
        }
        if !block.whole || block.frames.is_empty() {
            // Rewriting, a block that never ends properly: dropped at the
            // end of input (only then may output stop here).
            assert!(rewriting, "deciding, an unfinished block goes as it came");
            assert!(
                o == outs.len() && out_tail.is_empty(),
                "a partial block was rewritten"
            );
            return;
        }
        let mut fragment_in = Vec::new();
        for g in &block.frames {
            fragment_in.extend_from_slice(fragment(g).expect("a malformed frame was rewritten"));
        }
        let client = decode(&mut in_dec, &fragment_in)
            .expect("a block the independent decoder refuses was rewritten")
            .expect("a block over h2's header list limit was rewritten");
        // The rewritten block.
        let mut fragment_out = Vec::new();
        let first = outs.get(o).expect("a header block is missing");
        assert_eq!(first.kind, HEADERS);
        assert_eq!(first.stream, stream, "same stream");
        assert_eq!(
            first.flags & END_STREAM,
            block.frames[0].flags & END_STREAM,
            "END_STREAM kept"
        );
        loop {
            let g = outs.get(o).expect("the rewritten block ends");
            assert!(g.complete() && g.len <= MAX_FRAME, "a frame h2 accepts");
            assert!(g.kind == HEADERS || g.kind == CONTINUATION);
            assert_eq!(g.stream, stream);
            fragment_out.extend_from_slice(g.payload);
            o += 1;
            if g.flags & END_HEADERS != 0 {
                break;
            }
        }
        let forwarded = decode(&mut out_dec, &fragment_out)
            .expect("the rewritten block decodes")
            .expect("the rewritten block is under the limit");
        assert_eq!(
            without_authority(&forwarded),
            without_authority(&client),
            "the client's headers, :authority aside"
        );
        let (a_in, a_out) = (authorities(&client), authorities(&forwarded));
        if !rewriting {
            assert!(
                a_in.iter().any(|a| !valid(a)),
                "rewriting starts on an invalid :authority"
            );
        }
        // Each valid one kept, each invalid one replaced by its first
        // comma-separated element when that is valid, else dropped.
        let expected: Vec<&[u8]> = a_in
            .iter()
            .filter_map(|a| {
                if valid(a) {
                    return Some(*a);
                }
                let first = a.split(|b| *b == b',').next()?;
                valid(first).then_some(first)
            })
            .collect();
        assert_eq!(a_out, expected, "the :authority rule");
        rewriting = true;
        i = k;
    }
    // Input exhausted (but for a partial frame header).
    if rewriting {
        assert_eq!(o, outs.len(), "nothing made up");
        assert!(out_tail.is_empty() || out_tail == in_tail);
    } else {
        assert_eq!(&rest[offset(&outs, o)..], &body[offset(&ins, i)..]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(seed) * usize::from(seed) / 4;
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(body);
    let mut rw = Rewriter::new();
    let mut out = Vec::new();
    for piece in input.chunks(chunk) {
        rw.feed(piece);
        out.extend_from_slice(&rw.output().split());
        assert!(
            rw.buffered() <= piece.len() + 2 * (MAX_HEADER_LIST + 16 * 9) + MAX_FRAME + 9,
            "held {} bytes",
            rw.buffered()
        );
        if !rw.wants_input() {
            break;
        }
    }
    rw.end();
    out.extend_from_slice(&rw.output().split());
    check(&input, &out, rw.mode());
});

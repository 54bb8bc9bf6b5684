//! The byte-stream core of [`super::ListAuthority`], without I/O: bytes a
//! client sent go in ([`Rewriter::feed`]), the bytes h2 should see come out
//! ([`Rewriter::output`]).
//!
//! It never holds or produces more than h2 itself would accept (greet-server
//! runs h2 with its defaults, through tonic and hyper):
//! - a header frame's payload is at most [`MAX_FRAME`] (h2's
//!   SETTINGS_MAX_FRAME_SIZE), and a header block (HEADERS plus
//!   CONTINUATIONs, compressed) at most [`MAX_HEADER_LIST`] in up to 16
//!   frames: one frame and one block are held at a time;
//! - the HPACK dynamic table is at most [`TABLE_SIZE`] (the
//!   SETTINGS_HEADER_TABLE_SIZE h2 advertises): a table-size update above it
//!   is an error, as in h2;
//! - a decoded header list is kept only up to [`MAX_HEADER_LIST`] (hyper's
//!   SETTINGS_MAX_HEADER_LIST_SIZE, counted as h2 counts it: name + value +
//!   32 per field). Entries the decoder references are borrowed from its
//!   table, never copied, so a block of one-byte references to a big entry
//!   costs its length in work and nothing in memory.
//!
//! It decides on the connection's first header block:
//! - anything it cannot or need not handle there (not HTTP/2, a frame or
//!   block over the limits, an HPACK error, a list over the limit, a valid or
//!   absent `:authority`) and it steps aside: the client's bytes go to h2
//!   untouched, so h2 decodes them against its own table, applies its own
//!   limits and answers its own errors. Nothing was rewritten, so nothing
//!   can disagree;
//! - an invalid `:authority` (an address list) and it rewrites that block
//!   and every later one with its own encoder, whose table is the one h2's
//!   decoder follows. From then on there is no stepping aside (h2 would
//!   decode the client's bytes against the wrong table): anything it cannot
//!   handle closes the connection. It closes by handing h2 a header block
//!   that opens with a table-size update above [`TABLE_SIZE`]; h2 answers
//!   that with GOAWAY and closes, as for any undecodable header block.
//!
//! Self-contained (bytes, loona-hpack, http, tracing) so that the fuzz
//! target in `reliability/fuzz` compiles this file as it is.

use bytes::BytesMut;
use loona_hpack::{Decoder, Encoder};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// h2's default SETTINGS_MAX_FRAME_SIZE: the largest frame h2 accepts, and
/// the largest this layer holds or writes.
pub const MAX_FRAME: usize = 16_384;
/// hyper's default SETTINGS_MAX_HEADER_LIST_SIZE (tonic keeps it): the
/// largest decoded header list kept, and the largest compressed header block
/// held (h2 refuses larger ones itself).
pub const MAX_HEADER_LIST: usize = 16 << 10;
/// The SETTINGS_HEADER_TABLE_SIZE h2 advertises (the HTTP/2 default).
pub const TABLE_SIZE: usize = 4096;

const FRAME_HEADER: usize = 9;
/// The most a header block may take on the wire, frame headers included:
/// [`MAX_HEADER_LIST`] in up to 16 frames.
const MAX_BLOCK_WIRE: usize = MAX_HEADER_LIST + 16 * FRAME_HEADER;
/// HTTP/2 frame types (RFC 9113 section 6) the rewriter reads.
pub const HEADERS: u8 = 0x1;
/// The frame type that continues a header block.
pub const CONTINUATION: u8 = 0x9;
/// The frame type that carries a pushed request's header block.
pub const PUSH_PROMISE: u8 = 0x5;
/// HEADERS flag: the stream ends with this block.
pub const END_STREAM: u8 = 0x1;
/// HEADERS, PUSH_PROMISE and CONTINUATION flag: the block ends here.
pub const END_HEADERS: u8 = 0x4;
/// HEADERS and PUSH_PROMISE flag: a pad length leads the payload.
pub const PADDED: u8 = 0x8;
/// HEADERS flag: five bytes of priority lead the block.
pub const PRIORITY: u8 = 0x20;
/// An HPACK dynamic table size update to `TABLE_SIZE + 1`: h2 refuses it,
/// so the layer's closing block carries it.
pub const SIZE_UPDATE_OVER_LIMIT: [u8; 3] = [0x3f, 0xe2, 0x1f];

/// Where the rewriter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Before the first request's headers: deciding.
    Sniff,
    /// This client sends invalid authorities: every header block is
    /// re-encoded.
    Rewrite,
    /// Stepped aside: input goes out untouched.
    Pass,
    /// Closed: nothing more goes out after what [`Rewriter::output`] holds.
    Closed,
}

/// The header block being assembled (HEADERS plus CONTINUATIONs).
#[derive(Debug, Default)]
struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
    /// Bytes of its frames so far, frame headers included (a flood of
    /// empty CONTINUATIONs counts).
    wire: usize,
    /// The frames as received, forwarded unchanged if the block is not
    /// rewritten.
    raw: Vec<u8>,
}

/// A decoded header block, kept up to [`MAX_HEADER_LIST`].
struct Decoded {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The decoded list reached the limit: `headers` is incomplete.
    over: bool,
    /// It holds an `:authority` h2 would refuse.
    bad_authority: bool,
}

/// See the module docs.
pub struct Rewriter {
    mode: Mode,
    preface_left: usize,
    /// Payload bytes of the current non-header frame still to forward.
    passthrough: usize,
    inbuf: BytesMut,
    out: BytesMut,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter for a fresh connection.
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            mode: Mode::Sniff,
            preface_left: PREFACE.len(),
            passthrough: 0,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            block: None,
            decoder,
            encoder: Encoder::new(),
            scratch: Vec::new(),
        }
    }

    /// Where it stands.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether input still matters: false once closed.
    pub fn wants_input(&self) -> bool {
        self.mode != Mode::Closed
    }

    /// Whether it has stepped aside with nothing held: input can go straight
    /// to h2.
    pub fn is_transparent(&self) -> bool {
        self.mode == Mode::Pass && self.inbuf.is_empty()
    }

    /// Bytes held: the input not yet decided on (at most a frame plus what
    /// the caller fed at once) and the header block being assembled.
    pub fn buffered(&self) -> usize {
        self.inbuf.len()
            + self
                .block
                .as_ref()
                .map_or(0, |b| b.raw.len() + b.fragment.len())
    }

    /// What h2 should read next; the caller takes from the front.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Takes bytes the client sent.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.mode == Mode::Closed {
            return;
        }
        self.inbuf.extend_from_slice(bytes);
        self.process();
    }

    /// The client's side ended. Stepped aside or still deciding: what is
    /// held goes out as it came. Rewriting: a partial frame or block is
    /// dropped (it would be decoded against the wrong table).
    pub fn end(&mut self) {
        match self.mode {
            Mode::Sniff | Mode::Pass => {
                self.give_up();
                let rest = self.inbuf.split();
                self.out.extend_from_slice(&rest);
            }
            Mode::Rewrite => {
                self.block = None;
                self.inbuf.clear();
            }
            Mode::Closed => {}
        }
    }

    /// Moves what can be decided from `inbuf` to `out`.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::Closed => {
                    self.inbuf.clear();
                    return;
                }
                Mode::Pass => {
                    let rest = self.inbuf.split();
                    self.out.extend_from_slice(&rest);
                    return;
                }
                Mode::Sniff | Mode::Rewrite => {}
            }
            if self.preface_left > 0 {
                let done = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(self.inbuf.len());
                if n == 0 {
                    return;
                }
                if self.inbuf[..n] != PREFACE[done..done + n] {
                    // Not plaintext HTTP/2 (TLS, HTTP/1): not ours to touch.
                    self.mode = Mode::Pass;
                    continue;
                }
                let taken = self.inbuf.split_to(n);
                self.out.extend_from_slice(&taken);
                self.preface_left -= n;
                continue;
            }
            if self.passthrough > 0 {
                let n = self.passthrough.min(self.inbuf.len());
                if n == 0 {
                    return;
                }
                let taken = self.inbuf.split_to(n);
                self.out.extend_from_slice(&taken);
                self.passthrough -= n;
                continue;
            }
            if self.inbuf.len() < FRAME_HEADER {
                return;
            }
            let len = (usize::from(self.inbuf[0]) << 16)
                | (usize::from(self.inbuf[1]) << 8)
                | usize::from(self.inbuf[2]);
            let kind = self.inbuf[3];
            if kind == PUSH_PROMISE {
                // It carries a header block h2 decodes (before refusing it
                // from a client): h2's table would move apart from ours.
                self.cannot_handle("a PUSH_PROMISE from a client");
                continue;
            }
            let is_header = kind == HEADERS || kind == CONTINUATION;
            if !is_header {
                if self.block.is_some() {
                    // A header block must go on with a CONTINUATION.
                    self.cannot_handle("a frame inside a header block");
                    continue;
                }
                let header = self.inbuf.split_to(FRAME_HEADER);
                self.out.extend_from_slice(&header);
                self.passthrough = len;
                continue;
            }
            if len > MAX_FRAME {
                self.cannot_handle("a header frame over the frame size limit");
                continue;
            }
            let held = self.block.as_ref().map_or(0, |b| b.wire);
            if held + FRAME_HEADER + len > MAX_BLOCK_WIRE {
                self.cannot_handle("a header block over the header list limit");
                continue;
            }
            if self.inbuf.len() < FRAME_HEADER + len {
                return;
            }
            let frame = self.inbuf.split_to(FRAME_HEADER + len);
            self.header_frame(&frame);
        }
    }

    /// Something this layer does not handle. Deciding: step aside (h2 sees
    /// the client's own bytes and answers for itself). Rewriting: close.
    fn cannot_handle(&mut self, why: &'static str) {
        match self.mode {
            Mode::Sniff => {
                tracing::trace!(why, "first header block left to h2");
                self.give_up();
            }
            Mode::Rewrite => self.close(why),
            Mode::Pass | Mode::Closed => {}
        }
    }

    /// Forwards what was held back and steps aside for good.
    fn give_up(&mut self) {
        if let Some(block) = self.block.take() {
            self.out.extend_from_slice(&block.raw);
        }
        if self.mode == Mode::Sniff {
            self.mode = Mode::Pass;
        }
    }

    /// Ends the connection: h2 gets a header block it refuses (a table-size
    /// update over its limit), answers GOAWAY and closes; nothing else
    /// follows.
    fn close(&mut self, why: &'static str) {
        tracing::debug!(
            why,
            "closing a connection whose header blocks are rewritten"
        );
        let stream_id = self.block.take().map_or(1, |b| b.stream_id.max(1));
        self.out.extend_from_slice(&frame_header(
            SIZE_UPDATE_OVER_LIMIT.len(),
            HEADERS,
            END_HEADERS,
            stream_id,
        ));
        self.out.extend_from_slice(&SIZE_UPDATE_OVER_LIMIT);
        self.inbuf.clear();
        self.passthrough = 0;
        self.mode = Mode::Closed;
    }

    fn header_frame(&mut self, frame: &[u8]) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        if kind == HEADERS {
            if self.block.is_some() {
                return self.malformed(frame, "a HEADERS frame inside a header block");
            }
            if flags & PADDED != 0 {
                let Some((&pad, rest)) = payload.split_first() else {
                    return self.malformed(frame, "a padded frame without its pad length");
                };
                let Some(body) = rest.len().checked_sub(usize::from(pad)) else {
                    return self.malformed(frame, "padding longer than the frame");
                };
                payload = &rest[..body];
            }
            if flags & PRIORITY != 0 {
                // Stream priority is deprecated (RFC 9113) and h2 ignores
                // it: the re-encoded frame goes without.
                let Some(rest) = payload.get(5..) else {
                    return self.malformed(frame, "a priority longer than the frame");
                };
                payload = rest;
            }
            self.block = Some(Block {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                ..Block::default()
            });
        }
        let Some(block) = self.block.as_mut() else {
            return self.malformed(frame, "a CONTINUATION without a header block");
        };
        if block.stream_id != stream_id {
            return self.malformed(frame, "a CONTINUATION of another stream");
        }
        block.fragment.extend_from_slice(payload);
        block.wire += frame.len();
        if self.mode == Mode::Sniff {
            block.raw.extend_from_slice(frame);
        }
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.finish(block);
            }
        }
    }

    /// A frame h2 refuses: deciding, it goes to h2 as it came after what is
    /// held; rewriting, the connection closes.
    fn malformed(&mut self, frame: &[u8], why: &'static str) {
        match self.mode {
            Mode::Sniff => {
                self.give_up();
                self.out.extend_from_slice(frame);
            }
            _ => self.close(why),
        }
    }

    /// Decodes a block, keeping at most [`MAX_HEADER_LIST`] of it.
    fn decode(&mut self, fragment: &[u8]) -> Result<Decoded, loona_hpack::decoder::DecoderError> {
        let mut d = Decoded {
            headers: Vec::new(),
            over: false,
            bad_authority: false,
        };
        let mut size = 0usize;
        self.decoder.decode_with_cb(fragment, |name, value| {
            if d.over {
                return;
            }
            size += name.len() + value.len() + 32;
            if size >= MAX_HEADER_LIST {
                d.over = true;
                d.headers = Vec::new();
                return;
            }
            if &name[..] == b":authority" && !is_valid(&value) {
                d.bad_authority = true;
            }
            d.headers.push((name.into_owned(), value.into_owned()));
        })?;
        Ok(d)
    }

    fn finish(&mut self, block: Block) {
        let decoded = self.decode(&block.fragment);
        let mut decoded = match (self.mode, decoded) {
            (Mode::Sniff, Err(_)) => {
                self.out.extend_from_slice(&block.raw);
                self.mode = Mode::Pass;
                return;
            }
            (Mode::Sniff, Ok(d)) if d.over || !d.bad_authority => {
                self.out.extend_from_slice(&block.raw);
                self.mode = Mode::Pass;
                return;
            }
            (_, Err(_)) => return self.close("an undecodable header block"),
            (_, Ok(d)) if d.over => return self.close("a header list over the limit"),
            (_, Ok(d)) => d,
        };
        if self.mode == Mode::Sniff {
            tracing::debug!("client sends an address list as :authority; rewriting its requests");
            self.mode = Mode::Rewrite;
        }
        if decoded.bad_authority {
            // Every invalid one (a repeated :authority is h2's to refuse).
            decoded.headers.retain_mut(|(name, value)| {
                if &name[..] != b":authority" || is_valid(value) {
                    return true;
                }
                match first_valid(value) {
                    Some(first) => {
                        *value = first;
                        true
                    }
                    None => false,
                }
            });
        }
        self.scratch.clear();
        if self
            .encoder
            .encode_into(
                decoded.headers.iter().map(|(n, v)| (&n[..], &v[..])),
                &mut self.scratch,
            )
            .is_err()
        {
            // Writing to a Vec does not fail; if it did, the encoder's table
            // may have moved: close rather than guess.
            return self.close("re-encoding failed");
        }
        let encoded = std::mem::take(&mut self.scratch);
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[][..]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let (kind, mut flags) = if i == 0 {
                (HEADERS, if block.end_stream { END_STREAM } else { 0 })
            } else {
                (CONTINUATION, 0)
            };
            if i == last {
                flags |= END_HEADERS;
            }
            self.out
                .extend_from_slice(&frame_header(chunk.len(), kind, flags, block.stream_id));
            self.out.extend_from_slice(chunk);
        }
        self.scratch = encoded;
    }
}

fn frame_header(len: usize, kind: u8, flags: u8, stream_id: u32) -> [u8; FRAME_HEADER] {
    let id = stream_id.to_be_bytes();
    [
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        id[0],
        id[1],
        id[2],
        id[3],
    ]
}

/// Whether h2 accepts `value` as an `:authority`.
fn is_valid(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The first comma-separated element of an address list, when it is a
/// valid authority.
fn first_valid(list: &[u8]) -> Option<Vec<u8>> {
    let first = list.split(|b| *b == b',').next()?;
    http::uri::Authority::try_from(first)
        .ok()
        .map(|a| a.as_str().as_bytes().to_vec())
}

//! Binary frame format of the primary <-> worker channel.
//!
//! Every frame is a 16-byte little-endian header followed by `len` payload
//! bytes. File descriptors travel out of band (`SCM_RIGHTS`); the header only
//! announces how many belong to the frame. Everything here is pure: no I/O.
//!
//! | offset | size | field                              |
//! |--------|------|------------------------------------|
//! | 0      | 2    | magic `0x5343` (bytes `43 53`)     |
//! | 2      | 1    | kind                               |
//! | 3      | 1    | flags (opaque here)                |
//! | 4      | 2    | nfds, at most [`MAX_FDS`]          |
//! | 6      | 2    | reserved, must be 0                |
//! | 8      | 4    | seq (opaque here)                  |
//! | 12     | 4    | len, payload length in bytes       |

#![forbid(unsafe_code)]

use std::fmt;
use std::io;

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// Magic number at the start of every frame (`"CS"` on the wire).
pub const MAGIC: u16 = 0x5343;

/// Default cap on a frame's payload length (16 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// Most fds one frame may carry: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Worker -> primary: first frame, the worker is up.
    Online = 1,
    /// Worker -> primary: asks for a listening handle.
    QueryServer = 2,
    /// Primary -> worker: the answer, maybe with the listening fd.
    QueryReply = 3,
    /// Worker -> primary: a listener is listening.
    Listening = 4,
    /// Primary -> worker: connection fds handed over.
    NewConn = 5,
    /// Worker -> primary: accepted / rejected acks.
    ConnReply = 6,
    /// Worker -> primary: a listener was closed.
    Close = 7,
    /// Primary -> worker: please disconnect gracefully.
    Disconnect = 8,
    /// Worker -> primary: the worker is leaving on purpose.
    ExitedAfterDisconnect = 9,
    /// Either way: generic acknowledgement of `seq`.
    Ack = 10,
    /// Worker -> primary: `seq` more connections taken from shared
    /// sockets, or requests served (a flag), since the last one.
    Count = 11,
    /// User message: opaque bytes, never internal.
    User = 16,
}

impl Kind {
    /// Maps a wire byte to a kind; `None` for unassigned values.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Online,
            2 => Kind::QueryServer,
            3 => Kind::QueryReply,
            4 => Kind::Listening,
            5 => Kind::NewConn,
            6 => Kind::ConnReply,
            7 => Kind::Close,
            8 => Kind::Disconnect,
            9 => Kind::ExitedAfterDisconnect,
            10 => Kind::Ack,
            11 => Kind::Count,
            16 => Kind::User,
            _ => return None,
        })
    }

    /// True for the cluster's own control messages (everything but `User`).
    pub fn is_internal(self) -> bool {
        self != Kind::User
    }
}

/// Decoded header fields of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: Kind,
    /// Flags, opaque to this module.
    pub flags: u8,
    /// Number of fds that travel with this frame.
    pub nfds: u16,
    /// Sequence number or ack, opaque to this module.
    pub seq: u32,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// Encodes the 16 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = self.flags;
        b[4..6].copy_from_slice(&self.nfds.to_le_bytes());
        // b[6..8] is the reserved field, left zero.
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Typed decode/encode errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the header or header + payload need.
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed (`usize::MAX` if the need does not fit a `usize`).
        need: usize,
    },
    /// The first two bytes are not [`MAGIC`].
    BadMagic(u16),
    /// The kind byte is not a known [`Kind`].
    UnknownKind(u8),
    /// The reserved field is not zero.
    Reserved(u16),
    /// The payload is over the cap.
    TooLarge {
        /// Payload length (saturated to `u32::MAX` when encoding).
        len: u32,
        /// The cap in force.
        max: u32,
    },
    /// More fds than [`MAX_FDS`].
    TooManyFds(usize),
    /// The header announced a different number of fds than arrived.
    /// `announced: 0` is for fds that came where no frame announcing fds
    /// starts: mid-frame, or with a frame that announces none.
    FdCountMismatch {
        /// Fds announced by the header.
        announced: u16,
        /// Fds that actually arrived.
        received: usize,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::Truncated { have, need } => {
                write!(f, "truncated frame: have {have} bytes, need {need}")
            }
            WireError::BadMagic(m) => {
                write!(f, "bad frame magic {m:#06x} (expected {MAGIC:#06x})")
            }
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::Reserved(r) => {
                write!(f, "reserved frame header field is {r:#06x}, must be 0")
            }
            WireError::TooLarge { len, max } => {
                write!(f, "frame payload of {len} bytes exceeds the {max}-byte cap")
            }
            WireError::TooManyFds(n) => {
                write!(
                    f,
                    "frame carries {n} fds, more than the maximum of {MAX_FDS}"
                )
            }
            WireError::FdCountMismatch {
                announced: 0,
                received,
            } => write!(
                f,
                "{received} fds arrived where no frame announcing fds starts \
                 (fds ride only on the first byte of a frame that announces them)"
            ),
            WireError::FdCountMismatch {
                announced,
                received,
            } => write!(
                f,
                "frame announced {announced} fds but {received} were received"
            ),
        }
    }
}

impl std::error::Error for WireError {}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Builds header fields for a frame and checks them: len <= max_payload, nfds <= MAX_FDS.
///
/// Checks `nfds` first, then the length, matching [`decode_header`].
pub fn header(
    kind: Kind,
    flags: u8,
    seq: u32,
    payload_len: usize,
    nfds: usize,
    max_payload: u32,
) -> Result<Header, WireError> {
    if nfds > MAX_FDS {
        return Err(WireError::TooManyFds(nfds));
    }
    // A length that does not even fit the u32 field is reported saturated.
    let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    if u64::try_from(payload_len).unwrap_or(u64::MAX) > u64::from(max_payload) {
        return Err(WireError::TooLarge {
            len,
            max: max_payload,
        });
    }
    Ok(Header {
        kind,
        flags,
        // nfds <= MAX_FDS < u16::MAX, checked above.
        nfds: nfds as u16,
        seq,
        len,
    })
}

/// Appends one whole frame (header + payload) to `out`. Errors as [`header`].
///
/// On error `out` is left untouched.
pub fn encode(
    out: &mut Vec<u8>,
    kind: Kind,
    flags: u8,
    seq: u32,
    payload: &[u8],
    nfds: usize,
    max_payload: u32,
) -> Result<(), WireError> {
    let h = header(kind, flags, seq, payload.len(), nfds, max_payload)?;
    out.reserve(HEADER_LEN.saturating_add(payload.len()));
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
    Ok(())
}

/// Decodes and validates a header from the start of `buf` (only the first 16 bytes are looked at).
///
/// Order of checks: Truncated (buf shorter than 16), BadMagic, Reserved,
/// UnknownKind, TooManyFds, TooLarge.
pub fn decode_header(buf: &[u8], max_payload: u32) -> Result<Header, WireError> {
    let h: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(WireError::Truncated {
            have: buf.len(),
            need: HEADER_LEN,
        })?;
    let magic = u16::from_le_bytes([h[0], h[1]]);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(WireError::Reserved(reserved));
    }
    let kind = Kind::from_u8(h[2]).ok_or(WireError::UnknownKind(h[2]))?;
    let nfds = u16::from_le_bytes([h[4], h[5]]);
    if usize::from(nfds) > MAX_FDS {
        return Err(WireError::TooManyFds(usize::from(nfds)));
    }
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if len > max_payload {
        return Err(WireError::TooLarge {
            len,
            max: max_payload,
        });
    }
    Ok(Header {
        kind,
        flags: h[3],
        nfds,
        seq: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        len,
    })
}

/// Decodes one whole frame from the start of `buf`, given how many fds arrived for it.
///
/// Returns the header, the payload slice, and the total bytes consumed
/// (16 + len). Errors: those of [`decode_header`]; `Truncated { have, need }`
/// when the payload is incomplete; `FdCountMismatch` when
/// `fds_received != header.nfds`. Truncation is reported before an fd
/// mismatch so a caller with a partial buffer knows to read more first.
pub fn decode(
    buf: &[u8],
    fds_received: usize,
    max_payload: u32,
) -> Result<(Header, &[u8], usize), WireError> {
    let h = decode_header(buf, max_payload)?;
    // Checked: 16 + u32::MAX overflows usize on 32-bit targets.
    let need = usize::try_from(h.len)
        .ok()
        .and_then(|l| l.checked_add(HEADER_LEN))
        .unwrap_or(usize::MAX);
    let payload = buf.get(HEADER_LEN..need).ok_or(WireError::Truncated {
        have: buf.len(),
        need,
    })?;
    if fds_received != usize::from(h.nfds) {
        return Err(WireError::FdCountMismatch {
            announced: h.nfds,
            received: fds_received,
        });
    }
    Ok((h, payload, need))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_KINDS: [Kind; 12] = [
        Kind::Online,
        Kind::QueryServer,
        Kind::QueryReply,
        Kind::Listening,
        Kind::NewConn,
        Kind::ConnReply,
        Kind::Close,
        Kind::Disconnect,
        Kind::ExitedAfterDisconnect,
        Kind::Ack,
        Kind::Count,
        Kind::User,
    ];

    fn frame(kind: Kind, payload: &[u8], nfds: usize) -> Vec<u8> {
        let mut v = Vec::new();
        encode(
            &mut v,
            kind,
            0xA5,
            0xDEAD_BEEF,
            payload,
            nfds,
            DEFAULT_MAX_PAYLOAD,
        )
        .unwrap();
        v
    }

    #[test]
    fn header_layout_is_exact() {
        let h = Header {
            kind: Kind::NewConn,
            flags: 0x7F,
            nfds: 0x0102,
            seq: 0x0304_0506,
            len: 0x0708_090A,
        };
        assert_eq!(
            h.encode(),
            [
                0x43, 0x53, 5, 0x7F, 0x02, 0x01, 0, 0, 0x06, 0x05, 0x04, 0x03, 0x0A, 0x09, 0x08,
                0x07
            ]
        );
    }

    #[test]
    fn kind_from_u8_and_internal() {
        for k in ALL_KINDS {
            assert_eq!(Kind::from_u8(k as u8), Some(k));
            assert_eq!(k.is_internal(), k != Kind::User);
        }
        let known = (0..=255u8).filter(|&b| Kind::from_u8(b).is_some()).count();
        assert_eq!(known, ALL_KINDS.len());
    }

    #[test]
    fn round_trip_every_kind() {
        let big: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let payloads: [&[u8]; 3] = [&[], &[0x42], &big];
        for kind in ALL_KINDS {
            for p in payloads {
                for nfds in [0usize, 1, MAX_FDS] {
                    let mut buf = frame(kind, p, nfds);
                    assert_eq!(buf.len(), HEADER_LEN + p.len());
                    // Trailing bytes of a next frame must not be consumed.
                    buf.extend_from_slice(&[1, 2, 3]);
                    let hd = decode_header(&buf, DEFAULT_MAX_PAYLOAD).unwrap();
                    let (h, payload, used) = decode(&buf, nfds, DEFAULT_MAX_PAYLOAD).unwrap();
                    assert_eq!(hd, h);
                    assert_eq!(h.kind, kind);
                    assert_eq!(h.flags, 0xA5);
                    assert_eq!(h.seq, 0xDEAD_BEEF);
                    assert_eq!(usize::from(h.nfds), nfds);
                    assert_eq!(h.len as usize, p.len());
                    assert_eq!(payload, p);
                    assert_eq!(used, HEADER_LEN + p.len());
                }
            }
        }
    }

    #[test]
    fn truncated_header_at_every_length() {
        let buf = frame(Kind::Ack, &[], 0);
        for n in 0..HEADER_LEN {
            let want = WireError::Truncated {
                have: n,
                need: HEADER_LEN,
            };
            assert_eq!(
                decode_header(&buf[..n], DEFAULT_MAX_PAYLOAD),
                Err(want.clone())
            );
            assert_eq!(decode(&buf[..n], 0, DEFAULT_MAX_PAYLOAD), Err(want));
        }
    }

    #[test]
    fn truncated_payload() {
        let buf = frame(Kind::User, &[9; 10], 0);
        for n in HEADER_LEN..buf.len() {
            assert_eq!(
                decode(&buf[..n], 0, DEFAULT_MAX_PAYLOAD),
                Err(WireError::Truncated { have: n, need: 26 })
            );
        }
        // Truncation wins over an fd mismatch: the caller should read more first.
        assert_eq!(
            decode(&buf[..20], 3, DEFAULT_MAX_PAYLOAD),
            Err(WireError::Truncated { have: 20, need: 26 })
        );
    }

    #[test]
    fn huge_len_does_not_overflow() {
        let h = Header {
            kind: Kind::User,
            flags: 0,
            nfds: 0,
            seq: 0,
            len: u32::MAX,
        };
        let buf = h.encode();
        assert_eq!(
            decode(&buf, 0, u32::MAX),
            Err(WireError::Truncated {
                have: HEADER_LEN,
                need: (u32::MAX as usize).saturating_add(HEADER_LEN),
            })
        );
    }

    #[test]
    fn bad_magic() {
        let mut buf = frame(Kind::Ack, &[], 0);
        buf[0] = 0x00;
        buf[1] = 0x12;
        assert_eq!(
            decode_header(&buf, DEFAULT_MAX_PAYLOAD),
            Err(WireError::BadMagic(0x1200))
        );
        assert_eq!(
            decode(&buf, 0, DEFAULT_MAX_PAYLOAD),
            Err(WireError::BadMagic(0x1200))
        );
    }

    #[test]
    fn reserved_nonzero() {
        let mut buf = frame(Kind::Ack, &[], 0);
        buf[7] = 0x01;
        assert_eq!(
            decode_header(&buf, DEFAULT_MAX_PAYLOAD),
            Err(WireError::Reserved(0x0100))
        );
        // Reserved is checked before the kind.
        buf[2] = 0;
        assert_eq!(
            decode(&buf, 0, DEFAULT_MAX_PAYLOAD),
            Err(WireError::Reserved(0x0100))
        );
    }

    #[test]
    fn unknown_kind() {
        for k in [0u8, 12, 255] {
            let mut buf = frame(Kind::Ack, &[], 0);
            buf[2] = k;
            assert_eq!(
                decode_header(&buf, DEFAULT_MAX_PAYLOAD),
                Err(WireError::UnknownKind(k))
            );
            assert_eq!(
                decode(&buf, 0, DEFAULT_MAX_PAYLOAD),
                Err(WireError::UnknownKind(k))
            );
        }
    }

    #[test]
    fn too_many_fds() {
        let mut buf = frame(Kind::NewConn, &[], 0);
        buf[4..6].copy_from_slice(&254u16.to_le_bytes());
        assert_eq!(
            decode_header(&buf, DEFAULT_MAX_PAYLOAD),
            Err(WireError::TooManyFds(254))
        );
        assert_eq!(
            decode(&buf, 254, DEFAULT_MAX_PAYLOAD),
            Err(WireError::TooManyFds(254))
        );
        let mut out = Vec::new();
        assert_eq!(
            encode(&mut out, Kind::NewConn, 0, 0, &[], 254, DEFAULT_MAX_PAYLOAD),
            Err(WireError::TooManyFds(254))
        );
        assert!(out.is_empty());
        assert!(header(Kind::NewConn, 0, 0, 0, MAX_FDS, DEFAULT_MAX_PAYLOAD).is_ok());
    }

    #[test]
    fn too_large_and_cap_boundary() {
        let cap = 100u32;
        let mut out = Vec::new();
        assert_eq!(
            encode(&mut out, Kind::User, 0, 0, &[0; 101], 0, cap),
            Err(WireError::TooLarge { len: 101, max: cap })
        );
        assert!(out.is_empty());
        // Exactly the cap is fine, both ways.
        encode(&mut out, Kind::User, 0, 0, &[7; 100], 0, cap).unwrap();
        let (h, p, used) = decode(&out, 0, cap).unwrap();
        assert_eq!((h.len, p.len(), used), (100, 100, 116));
        // The same frame is over a cap one smaller.
        assert_eq!(
            decode_header(&out, cap - 1),
            Err(WireError::TooLarge {
                len: 100,
                max: cap - 1
            })
        );
        assert_eq!(
            decode(&out, 0, cap - 1),
            Err(WireError::TooLarge {
                len: 100,
                max: cap - 1
            })
        );
        // Oversized length is rejected before any payload is needed.
        assert_eq!(
            decode_header(&out[..HEADER_LEN], cap - 1),
            Err(WireError::TooLarge {
                len: 100,
                max: cap - 1
            })
        );
        assert_eq!(
            header(
                Kind::User,
                0,
                0,
                DEFAULT_MAX_PAYLOAD as usize + 1,
                0,
                DEFAULT_MAX_PAYLOAD
            ),
            Err(WireError::TooLarge {
                len: DEFAULT_MAX_PAYLOAD + 1,
                max: DEFAULT_MAX_PAYLOAD
            })
        );
        assert!(header(
            Kind::User,
            0,
            0,
            DEFAULT_MAX_PAYLOAD as usize,
            0,
            DEFAULT_MAX_PAYLOAD
        )
        .is_ok());
        assert_eq!(
            WireError::TooLarge {
                len: 20_000_000,
                max: DEFAULT_MAX_PAYLOAD
            }
            .to_string(),
            "frame payload of 20000000 bytes exceeds the 16777216-byte cap"
        );
    }

    #[test]
    fn fd_count_mismatch_both_ways() {
        let buf = frame(Kind::NewConn, &[1, 2], 2);
        assert_eq!(
            decode(&buf, 1, DEFAULT_MAX_PAYLOAD),
            Err(WireError::FdCountMismatch {
                announced: 2,
                received: 1
            })
        );
        assert_eq!(
            decode(&buf, 3, DEFAULT_MAX_PAYLOAD),
            Err(WireError::FdCountMismatch {
                announced: 2,
                received: 3
            })
        );
        assert!(decode(&buf, 2, DEFAULT_MAX_PAYLOAD).is_ok());
    }

    #[test]
    fn io_error_conversion() {
        let e: io::Error = WireError::UnknownKind(42).into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let inner = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<WireError>())
            .cloned();
        assert_eq!(inner, Some(WireError::UnknownKind(42)));
        let back = e.into_inner().unwrap().downcast::<WireError>().unwrap();
        assert_eq!(*back, WireError::UnknownKind(42));
    }

    #[test]
    fn display_is_nonempty() {
        let all = [
            WireError::Truncated { have: 1, need: 16 },
            WireError::BadMagic(1),
            WireError::UnknownKind(1),
            WireError::Reserved(1),
            WireError::TooLarge { len: 2, max: 1 },
            WireError::TooManyFds(254),
            WireError::FdCountMismatch {
                announced: 1,
                received: 0,
            },
        ];
        for e in all {
            assert!(!e.to_string().is_empty());
        }
    }

    /// xorshift64*: tiny, deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn check(buf: &[u8], rng: &mut Rng) -> bool {
        let cap = match rng.below(4) {
            0 => 0,
            1 => rng.below(128) as u32,
            2 => DEFAULT_MAX_PAYLOAD,
            _ => u32::MAX,
        };
        let fds = rng.below(MAX_FDS as u64 + 3) as usize;
        let _ = decode_header(buf, cap);
        match decode(buf, fds, cap) {
            Ok((h, payload, used)) => {
                assert!(used <= buf.len());
                assert_eq!(used, HEADER_LEN + payload.len());
                assert_eq!(payload, &buf[HEADER_LEN..used]);
                assert_eq!(h.len as usize, payload.len());
                assert_eq!(usize::from(h.nfds), fds);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn decoder_survives_random_truncated_and_bitflipped_input() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut framed = 0usize;
        let mut valid_ok = 0usize;
        let mut buf = Vec::with_capacity(HEADER_LEN + 64);
        for _ in 0..200_000 {
            buf.clear();
            let family = rng.below(3);
            if family == 0 {
                let n = rng.below(64) as usize;
                buf.extend((0..n).map(|_| rng.next() as u8));
                check(&buf, &mut rng);
                continue;
            }
            let kind = ALL_KINDS[rng.below(ALL_KINDS.len() as u64) as usize];
            let plen = rng.below(48) as usize;
            let payload: Vec<u8> = (0..plen).map(|_| rng.next() as u8).collect();
            let nfds = rng.below(MAX_FDS as u64 + 1) as usize;
            let flags = rng.next() as u8;
            let seq = rng.next() as u32;
            encode(
                &mut buf,
                kind,
                flags,
                seq,
                &payload,
                nfds,
                DEFAULT_MAX_PAYLOAD,
            )
            .unwrap();
            framed += 1;

            // The un-mutated frame must decode exactly.
            if let Ok((h, p, used)) = decode(&buf, nfds, DEFAULT_MAX_PAYLOAD) {
                assert_eq!((h.kind, h.flags, h.seq), (kind, flags, seq));
                assert_eq!(p, &payload[..]);
                assert_eq!(used, buf.len());
                valid_ok += 1;
            }

            if family == 1 {
                let cut = rng.below(buf.len() as u64 + 1) as usize;
                buf.truncate(cut);
            } else {
                for _ in 0..1 + rng.below(4) {
                    let bit = rng.below(buf.len() as u64 * 8) as usize;
                    buf[bit / 8] ^= 1 << (bit % 8);
                }
            }
            check(&buf, &mut rng);
        }
        assert!(valid_ok > 0);
        assert_eq!(valid_ok, framed);
    }
}

//! A framed channel over one end of an `AF_UNIX` stream socketpair.
//!
//! fds ride on the first byte of their frame: a `sendmsg` that carries fds
//! always starts at the header of the frame that owns them, and one frame's
//! fds always travel in one `sendmsg`. Linux attaches the fds to the first
//! skb of that call and ends a `recvmsg` right after an skb with fds, so the
//! receiver knows the byte range `[start, end)` each batch of fds came with:
//! exactly one frame with `nfds > 0` starts in that range, and it owns them
//! all. Anything else is a protocol error as soon as the headers in that
//! range are known, not when the frame completes: fds on a byte where no
//! frame announcing fds starts, or a count other than the one announced.
//! The offending fds are closed at once and nothing more is read; the
//! frames wholly before the fault are still delivered, then the error. The
//! fds of a failed channel are closed, never leaked.
//!
//! Two ways to write: [`Channel::send`] on a blocking channel writes it all
//! (a worker); on a non-blocking one it writes what the socket takes now and
//! queues the rest for [`Channel::flush`] on writability (the primary).
//!
//! What a peer can make this end hold is bounded: the receive buffer grows
//! with the bytes that actually arrive (a header alone commits nothing), at
//! most [`MAX_HELD_FDS`] received fds wait for their frame, and the send
//! queue of a non-blocking channel holds at most
//! [`DEFAULT_MAX_QUEUED_BYTES`] and [`DEFAULT_MAX_QUEUED_FDS`] (settable)
//! before [`Channel::send`] fails with [`QueueFull`]. Both ends refuse to
//! send a payload over the send cap (`InvalidInput`, nothing sent).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::wire::{self, Header, Kind, WireError, HEADER_LEN, MAX_FDS};
use crate::sys;

const READ_CHUNK: usize = 64 * 1024;

/// Default cap on the bytes a non-blocking channel queues for a peer that
/// does not read: 32 MiB, room for a frame of the largest default payload
/// (16 MiB) queued behind another one still being written.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 32 * 1024 * 1024;

/// Default cap on the fds a non-blocking channel queues (each is a
/// duplicate held open until the peer reads its frame): 512, room for a
/// full round-robin window (253) and more, and half the common default
/// `RLIMIT_NOFILE` of 1024, which one peer alone cannot then exhaust.
pub const DEFAULT_MAX_QUEUED_FDS: usize = 512;

/// Most received fds a channel holds before their frames are delivered:
/// those of the frame being read and of the next one.
pub const MAX_HELD_FDS: usize = 2 * MAX_FDS;

/// One received frame with the fds that came with it.
#[derive(Debug)]
pub struct Frame {
    /// The decoded header.
    pub header: Header,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The fds that travelled with the frame, close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// fds the header announced that the kernel could not install here
    /// (`MSG_CTRUNC`, usually `EMFILE`). The frame itself is intact.
    pub lost_fds: usize,
}

/// What a non-blocking read produced.
#[derive(Debug)]
pub enum Recv {
    /// A whole frame.
    Frame(Frame),
    /// Nothing complete yet; wait for readability.
    WouldBlock,
    /// The peer closed the channel at a frame boundary.
    Eof,
}

/// Why [`Channel::send`] on a non-blocking channel refused a frame: the
/// peer does not read, and the queue would pass its cap. It is the inner
/// error of an `io::ErrorKind::OutOfMemory` error; nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Bytes already queued.
    pub queued_bytes: usize,
    /// fds already queued.
    pub queued_fds: usize,
    /// The byte cap in force.
    pub max_bytes: usize,
    /// The fd cap in force.
    pub max_fds: usize,
    /// Bytes of the refused frame (header included).
    pub frame_bytes: usize,
    /// fds of the refused frame.
    pub frame_fds: usize,
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outgoing queue over {} bytes / {} fds ({} bytes and {} fds queued, \
             a frame of {} bytes and {} fds refused)",
            self.max_bytes,
            self.max_fds,
            self.queued_bytes,
            self.queued_fds,
            self.frame_bytes,
            self.frame_fds
        )
    }
}

impl std::error::Error for QueueFull {}

/// A queued frame (or what is left of it) and its fds, which go with its
/// first byte.
#[derive(Debug)]
struct Queued {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

#[derive(Debug)]
struct Batch {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
    /// Stream offset of the frame that owns the fds, once its header is in.
    owner: Option<u64>,
}

/// A framed, fd-passing channel. See the module docs.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    nonblocking: bool,
    max_payload: u32,
    max_send_payload: u32,
    // Read side: buf[head..tail] is unparsed; `offset` is the stream
    // position of buf[head].
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    offset: u64,
    batches: VecDeque<Batch>,
    eof: bool,
    /// The last read took less than it had room for and no fds: the socket
    /// was empty then (Unix stream reads only stop short at an skb with
    /// fds, or with nothing left).
    drained: bool,
    // A protocol error found ahead of the frames before it: those frames
    // (ending by this stream offset) are delivered first, then the error.
    deferred: Option<(u64, io::Error)>,
    broken: Option<String>,
    // Write side: frames not yet written, oldest first, the front one from
    // byte `wpos`. One buffer per frame: a long queue is never copied to grow.
    out: VecDeque<Queued>,
    wpos: usize,
    queued_bytes: usize,
    queued_fds: usize,
    max_queued_bytes: usize,
    max_queued_fds: usize,
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel {
    /// Wraps one end of a socketpair. `nonblocking` picks the primary's
    /// buffered mode; the socket itself is never switched to `O_NONBLOCK`
    /// (each call passes `MSG_DONTWAIT` instead).
    pub fn new(fd: OwnedFd, nonblocking: bool) -> Channel {
        Channel {
            fd,
            nonblocking,
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
            max_send_payload: wire::DEFAULT_MAX_PAYLOAD,
            buf: Vec::new(),
            head: 0,
            tail: 0,
            offset: 0,
            batches: VecDeque::new(),
            eof: false,
            drained: false,
            deferred: None,
            broken: None,
            out: VecDeque::new(),
            wpos: 0,
            queued_bytes: 0,
            queued_fds: 0,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            max_queued_fds: DEFAULT_MAX_QUEUED_FDS,
        }
    }

    /// Sets the payload cap for frames this end receives (default 16 MiB).
    pub fn set_max_payload(&mut self, max: u32) {
        self.max_payload = max;
    }

    /// Sets the payload cap for frames this end sends (default 16 MiB, the
    /// peer's default receive cap): [`Channel::send`] refuses a larger
    /// payload with `InvalidInput`.
    pub fn set_max_send_payload(&mut self, max: u32) {
        self.max_send_payload = max;
    }

    /// Sets what a non-blocking channel may queue for a peer that does not
    /// read (defaults [`DEFAULT_MAX_QUEUED_BYTES`], [`DEFAULT_MAX_QUEUED_FDS`]).
    /// A frame that would take the queue past either cap is refused with
    /// [`QueueFull`]; a frame sent while nothing is queued is always taken.
    pub fn set_queue_limits(&mut self, max_bytes: usize, max_fds: usize) {
        self.max_queued_bytes = max_bytes;
        self.max_queued_fds = max_fds;
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued_bytes
    }

    /// fds queued (duplicates held until their frame is written).
    pub fn queued_fds(&self) -> usize {
        self.queued_fds
    }

    /// True while queued bytes wait for writability.
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// Sends one frame. fds are borrowed: if the frame must be queued, they
    /// are duplicated (close-on-exec) so the caller may close its own.
    ///
    /// Errors, with nothing sent or queued: `InvalidInput` for a payload
    /// over the send cap or more than 253 fds; on a non-blocking channel
    /// with frames already queued, `OutOfMemory` wrapping [`QueueFull`] when
    /// this frame would take the queue past its caps.
    pub fn send(
        &mut self,
        kind: Kind,
        flags: u8,
        seq: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let header = wire::header(
            kind,
            flags,
            seq,
            payload.len(),
            fds.len(),
            self.max_send_payload,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot send: {e}")))?
        .encode();
        let total = HEADER_LEN + payload.len();
        if !self.wants_write() {
            let sent = self.write_now(&[&header, payload], fds)?;
            if sent == total {
                return Ok(());
            }
            // What is left goes to the queue; the fds went with the first byte.
            let mut rest = Vec::with_capacity(total - sent);
            if sent < HEADER_LEN {
                rest.extend_from_slice(&header[sent..]);
                rest.extend_from_slice(payload);
            } else {
                rest.extend_from_slice(&payload[sent - HEADER_LEN..]);
            }
            let fds = if sent == 0 { dup_all(fds)? } else { Vec::new() };
            self.push(rest, fds);
            return Ok(());
        }
        if self.queued_bytes + total > self.max_queued_bytes
            || self.queued_fds + fds.len() > self.max_queued_fds
        {
            let full = QueueFull {
                queued_bytes: self.queued_bytes,
                queued_fds: self.queued_fds,
                max_bytes: self.max_queued_bytes,
                max_fds: self.max_queued_fds,
                frame_bytes: total,
                frame_fds: fds.len(),
            };
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, full));
        }
        let dups = dup_all(fds)?;
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(payload);
        self.push(bytes, dups);
        Ok(())
    }

    fn push(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        self.queued_bytes += bytes.len();
        self.queued_fds += fds.len();
        self.out.push_back(Queued { bytes, fds });
    }

    // Writes as much as the socket takes now (all of it when blocking).
    fn write_now(&mut self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        while sent < total {
            let mut slices: [IoSlice<'_>; 2] = [IoSlice::new(&[]), IoSlice::new(&[])];
            let mut skip = sent;
            for (slot, part) in slices.iter_mut().zip(parts) {
                let from = skip.min(part.len());
                skip -= from;
                *slot = IoSlice::new(&part[from..]);
            }
            let with = if sent == 0 { fds } else { &[] };
            match sys::msg::send(self.fd.as_fd(), &slices, with, self.nonblocking) {
                Ok(n) => sent += n,
                Err(e) if self.nonblocking && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Writes queued bytes. `Ok(true)` once the queue is empty; `Ok(false)`
    /// when the socket is full again (wait for writability).
    pub fn flush(&mut self) -> io::Result<bool> {
        // One sendmsg: the front frame, then the next ones up to the next
        // frame with fds (which must start its own sendmsg).
        const BATCH: usize = 64;
        while let Some(front) = self.out.front() {
            let mut slices = [IoSlice::new(&[]); BATCH];
            slices[0] = IoSlice::new(&front.bytes[self.wpos..]);
            let mut used = 1;
            for q in self.out.iter().skip(1).take(BATCH - 1) {
                if !q.fds.is_empty() {
                    break;
                }
                slices[used] = IoSlice::new(&q.bytes);
                used += 1;
            }
            let fds: Vec<BorrowedFd<'_>> = front.fds.iter().map(|f| f.as_fd()).collect();
            match sys::msg::send(self.fd.as_fd(), &slices[..used], &fds, self.nonblocking) {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    // Drops `n` written bytes from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        self.queued_bytes -= n;
        while n > 0 {
            let Some(front) = self.out.front_mut() else {
                return;
            };
            // The fds went with the first byte written.
            self.queued_fds -= front.fds.len();
            front.fds.clear();
            let left = front.bytes.len() - self.wpos;
            if n < left {
                self.wpos += n;
                return;
            }
            n -= left;
            self.wpos = 0;
            self.out.pop_front();
        }
    }

    /// Reads and returns the next frame without blocking.
    pub fn try_recv(&mut self) -> io::Result<Recv> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Recv::Frame(frame));
            }
            if self.eof {
                return self.eof_result().map(|_| Recv::Eof);
            }
            match self.fill(true) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Recv::WouldBlock),
                Err(e) => return Err(e),
            }
        }
    }

    /// Like [`Channel::try_recv`], but `WouldBlock` without a syscall when
    /// the last read emptied the socket. For a caller woken by a
    /// level-triggered poll, which reports anything that arrives later:
    /// it saves the `recvmsg` that would only say `EAGAIN`.
    pub fn try_recv_lazy(&mut self) -> io::Result<Recv> {
        if self.drained && !self.eof && self.deferred.is_none() {
            if let Some(frame) = self.parse()? {
                return Ok(Recv::Frame(frame));
            }
            self.drained = false;
            return Ok(Recv::WouldBlock);
        }
        self.try_recv()
    }

    /// Blocks for the next frame. `Ok(None)` when the peer closed the channel
    /// at a frame boundary.
    pub fn recv(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Some(frame));
            }
            if self.eof {
                return self.eof_result().map(|_| None);
            }
            self.fill(false)?;
        }
    }

    /// True when received bytes wait in the buffer. Poll on the fd will not
    /// report them: read them with [`Channel::try_recv`] before waiting.
    pub fn has_buffered(&self) -> bool {
        self.head != self.tail
    }

    /// True once the peer's end is closed and every buffered frame was read.
    pub fn is_eof(&self) -> bool {
        self.eof && self.head == self.tail
    }

    fn eof_result(&mut self) -> io::Result<()> {
        if self.head != self.tail {
            let have = self.tail - self.head;
            let need = match wire::decode_header(&self.buf[self.head..self.tail], self.max_payload)
            {
                Ok(h) => HEADER_LEN + h.len as usize,
                Err(_) => HEADER_LEN,
            };
            return Err(self.fail(WireError::Truncated { have, need }.into()));
        }
        let left: usize = self.batches.iter().map(|b| b.fds.len()).sum();
        self.batches.clear();
        if left > 0 {
            return Err(self.fail(
                WireError::FdCountMismatch {
                    announced: 0,
                    received: left,
                }
                .into(),
            ));
        }
        Ok(())
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.broken = Some(e.to_string());
        self.batches.clear();
        e
    }

    fn fill(&mut self, dontwait: bool) -> io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("channel already failed: {why}"),
            ));
        }
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
            if self.buf.len() > 4 * READ_CHUNK {
                self.buf = Vec::new();
            }
        }
        if self.buf.len() - self.tail < READ_CHUNK / 4 && self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if self.buf.len() - self.tail < READ_CHUNK / 4 {
            // Grow with the bytes that did arrive (at most doubling), never
            // by the length a header announces.
            let have = self.tail - self.head;
            self.buf.resize(self.tail + have.max(READ_CHUNK), 0);
        }
        let start = self.offset + (self.tail - self.head) as u64;
        let mut fds = Vec::new();
        let res = sys::msg::recv(
            self.fd.as_fd(),
            &mut self.buf[self.tail..],
            &mut fds,
            dontwait,
        );
        let room = self.buf.len() - self.tail;
        let (n, truncated) = match res {
            Ok(n) => (n, false),
            Err(e) => match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<sys::msg::Truncated>())
            {
                Some(t) => (t.bytes, true),
                None => return Err(e),
            },
        };
        if n == 0 && !truncated {
            self.eof = true;
            return Ok(());
        }
        self.drained = n < room && fds.is_empty() && !truncated;
        self.tail += n;
        if !fds.is_empty() || truncated {
            self.batches.push_back(Batch {
                start,
                end: start + n as u64,
                fds,
                truncated,
                owner: None,
            });
        }
        if self.batches.iter().any(|b| b.owner.is_none()) {
            if let Err((at, i, e)) = self.resolve() {
                // Close the offending fds now and read no more; the frames
                // wholly before `at` are still delivered (see `parse`).
                self.batches.truncate(i);
                self.deferred = Some((at, e.into()));
                return Ok(());
            }
        }
        let held: usize = self.batches.iter().map(|b| b.fds.len()).sum();
        if held > MAX_HELD_FDS {
            return Err(self.fail(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{held} received fds wait for their frames, more than the \
                     {MAX_HELD_FDS} a channel holds"
                ),
            )));
        }
        Ok(())
    }

    // Gives each batch without an owner the one frame announcing fds that
    // starts in its byte range, as soon as the headers there are in. A
    // batch stays unowned only while the header of the last buffered frame,
    // which starts in its range, is incomplete. An error says from which
    // stream offset the stream is bad and which batch is the first to drop.
    fn resolve(&mut self) -> Result<(), (u64, usize, WireError)> {
        let mut i = 0;
        while i < self.batches.len() {
            let b = &self.batches[i];
            if b.owner.is_some() {
                i += 1;
                continue;
            }
            let (start, end) = (b.start, b.end);
            // Walk the frame starts from the head up to `end`. Inside the
            // loop `at < end <= stream position of tail`, so `pos < tail`.
            let (mut pos, mut at) = (self.head, self.offset);
            let mut owner = None;
            let mut undecided = false;
            // The frame holding the last byte read with the fds.
            let mut last = at;
            while at < end {
                last = at;
                let avail = &self.buf[pos..self.tail];
                if avail.len() < HEADER_LEN {
                    undecided = at >= start;
                    break;
                }
                let h = wire::decode_header(avail, self.max_payload).map_err(|e| (at, i, e))?;
                if at >= start && h.nfds > 0 {
                    owner = Some((at, h.nfds));
                    break;
                }
                let total = HEADER_LEN + h.len as usize;
                at += total as u64;
                pos += total;
            }
            match owner {
                // Batch ranges are disjoint, so no other batch owns `at`.
                Some((at, announced)) => {
                    if !b.truncated && b.fds.len() != usize::from(announced) {
                        let e = WireError::FdCountMismatch {
                            announced,
                            received: b.fds.len(),
                        };
                        return Err((at, i, e));
                    }
                    self.batches[i].owner = Some(at);
                    i += 1;
                }
                None if undecided => i += 1,
                // fds lost in transit on a byte nobody claims: nothing is
                // held, and the frames stay in step.
                None if b.truncated => {
                    self.batches.remove(i);
                }
                // The fds rode on the last skb read, so frames before the
                // last one touched are not at fault.
                None => {
                    let e = WireError::FdCountMismatch {
                        announced: 0,
                        received: b.fds.len(),
                    };
                    return Err((last, i, e));
                }
            }
        }
        Ok(())
    }

    fn parse(&mut self) -> io::Result<Option<Frame>> {
        if self.broken.is_some() {
            return Err(self.fill(true).unwrap_err());
        }
        if let Some((at, _)) = self.deferred {
            if !self.whole_frame_ends_by(at) {
                let (_, e) = self.deferred.take().expect("checked");
                return Err(self.fail(e));
            }
        }
        let avail = &self.buf[self.head..self.tail];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = match wire::decode_header(avail, self.max_payload) {
            Ok(h) => h,
            Err(e) => return Err(self.fail(e.into())),
        };
        let total = HEADER_LEN + header.len as usize;
        if avail.len() < total {
            // The buffer grows as the payload arrives (see `fill`).
            return Ok(None);
        }
        let start = self.offset;
        let (fds, lost_fds) = match self.claim(start, header.nfds) {
            Ok(v) => v,
            Err(e) => return Err(self.fail(e.into())),
        };
        let payload = self.buf[self.head + HEADER_LEN..self.head + total].to_vec();
        self.head += total;
        self.offset += total as u64;
        Ok(Some(Frame {
            header,
            payload,
            fds,
            lost_fds,
        }))
    }

    // True when a whole, well-formed frame at the head ends by stream
    // offset `at`.
    fn whole_frame_ends_by(&self, at: u64) -> bool {
        let avail = &self.buf[self.head..self.tail];
        match wire::decode_header(avail, self.max_payload) {
            Ok(h) => {
                let total = HEADER_LEN + h.len as usize;
                avail.len() >= total && self.offset + total as u64 <= at
            }
            Err(_) => false,
        }
    }

    // The fds of the complete frame at stream offset `s`, which `resolve`
    // gave it when its header came in.
    fn claim(&mut self, s: u64, announced: u16) -> Result<(Vec<OwnedFd>, usize), WireError> {
        if announced == 0 {
            return Ok((Vec::new(), 0));
        }
        match self.batches.front() {
            Some(b) if b.owner == Some(s) => {
                let b = self.batches.pop_front().expect("front exists");
                if b.truncated {
                    Ok((Vec::new(), usize::from(announced)))
                } else {
                    Ok((b.fds, 0))
                }
            }
            _ => Err(WireError::FdCountMismatch {
                announced,
                received: 0,
            }),
        }
    }
}

fn dup_all(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<OwnedFd>> {
    fds.iter().map(|f| sys::fd::dup(*f)).collect()
}

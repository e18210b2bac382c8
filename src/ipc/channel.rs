//! A framed channel over one end of an `AF_UNIX` stream socketpair.
//!
//! fds ride on the first byte of their frame: a `sendmsg` that carries fds
//! always starts at the header of the frame that owns them, and one frame's
//! fds always travel in one `sendmsg`. Linux attaches the fds to the first
//! skb of that call and ends a `recvmsg` right after an skb with fds, so the
//! receiver knows the byte range `[start, end)` each batch of fds came with:
//! exactly one frame with `nfds > 0` starts in that range, and it owns them
//! all. Any other arrangement is a protocol error, and unclaimed fds are
//! closed, never leaked.
//!
//! Two ways to write: [`Channel::send`] on a blocking channel writes it all
//! (a worker); on a non-blocking one it writes what the socket takes now and
//! queues the rest for [`Channel::flush`] on writability (the primary).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::wire::{self, Header, Kind, WireError, HEADER_LEN};
use crate::sys;

const READ_CHUNK: usize = 64 * 1024;

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

#[derive(Debug)]
struct Batch {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// A framed, fd-passing channel. See the module docs.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    nonblocking: bool,
    max_payload: u32,
    // Read side: buf[head..tail] is unparsed; `offset` is the stream
    // position of buf[head].
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    offset: u64,
    batches: VecDeque<Batch>,
    eof: bool,
    broken: Option<String>,
    // Write side: out[wpos..] is queued; marks hold the fds of queued frames
    // by their offset in `out`.
    out: Vec<u8>,
    wpos: usize,
    marks: VecDeque<(usize, Vec<OwnedFd>)>,
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn protocol(e: WireError) -> io::Error {
    e.into()
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
            buf: Vec::new(),
            head: 0,
            tail: 0,
            offset: 0,
            batches: VecDeque::new(),
            eof: false,
            broken: None,
            out: Vec::new(),
            wpos: 0,
            marks: VecDeque::new(),
        }
    }

    /// Sets the payload cap for frames this end receives (default 16 MiB).
    pub fn set_max_payload(&mut self, max: u32) {
        self.max_payload = max;
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.out.len() - self.wpos
    }

    /// True while queued bytes wait for writability.
    pub fn wants_write(&self) -> bool {
        self.queued() > 0
    }

    /// Sends one frame. fds are borrowed: if the frame must be queued, they
    /// are duplicated (close-on-exec) so the caller may close its own.
    pub fn send(
        &mut self,
        kind: Kind,
        flags: u8,
        seq: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let header = wire::header(kind, flags, seq, payload.len(), fds.len(), u32::MAX)
            .map_err(protocol)?
            .encode();
        if !self.wants_write() {
            let total = HEADER_LEN + payload.len();
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
            if sent == 0 && !fds.is_empty() {
                self.marks.push_back((0, dup_all(fds)?));
            }
            self.out = rest;
            self.wpos = 0;
            return Ok(());
        }
        if self.wpos > 0 && self.wpos >= self.out.len() / 2 {
            // Compact so a queue that never empties does not grow forever.
            self.out.drain(..self.wpos);
            for (off, _) in self.marks.iter_mut() {
                *off -= self.wpos;
            }
            self.wpos = 0;
        }
        if !fds.is_empty() {
            let dups = dup_all(fds)?;
            self.marks.push_back((self.out.len(), dups));
        }
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(payload);
        Ok(())
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
        while self.wpos < self.out.len() {
            let at_mark = matches!(self.marks.front(), Some((off, _)) if *off == self.wpos);
            let next_mark = self
                .marks
                .iter()
                .map(|(off, _)| *off)
                .find(|&off| off > self.wpos)
                .unwrap_or(self.out.len());
            let chunk = &self.out[self.wpos..next_mark];
            let res = {
                let borrowed: Vec<BorrowedFd<'_>> = match (at_mark, self.marks.front()) {
                    (true, Some((_, fds))) => fds.iter().map(|f| f.as_fd()).collect(),
                    _ => Vec::new(),
                };
                sys::msg::send(
                    self.fd.as_fd(),
                    &[IoSlice::new(chunk)],
                    &borrowed,
                    self.nonblocking,
                )
            };
            match res {
                Ok(n) => {
                    if at_mark && n > 0 {
                        self.marks.pop_front();
                    }
                    self.wpos += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.wpos = 0;
        Ok(true)
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
        if let Some(b) = self.batches.pop_front() {
            let n = b.fds.len();
            drop(b);
            if n > 0 {
                return Err(self.fail(
                    WireError::FdCountMismatch {
                        announced: 0,
                        received: n,
                    }
                    .into(),
                ));
            }
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
        if self.buf.len() - self.tail < READ_CHUNK / 4 {
            if self.head > 0 {
                self.buf.copy_within(self.head..self.tail, 0);
                self.tail -= self.head;
                self.head = 0;
            }
            let want = (self.tail + READ_CHUNK).max(self.buf.len());
            self.buf.resize(want, 0);
        }
        let start = self.offset + (self.tail - self.head) as u64;
        let mut fds = Vec::new();
        let res = sys::msg::recv(
            self.fd.as_fd(),
            &mut self.buf[self.tail..],
            &mut fds,
            dontwait,
        );
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
        self.tail += n;
        if !fds.is_empty() || truncated {
            self.batches.push_back(Batch {
                start,
                end: start + n as u64,
                fds,
                truncated,
            });
        }
        Ok(())
    }

    fn parse(&mut self) -> io::Result<Option<Frame>> {
        if self.broken.is_some() {
            return Err(self.fill(true).unwrap_err());
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
            if self.buf.len() - self.head < total {
                // Make room for the whole frame at once.
                self.buf.copy_within(self.head..self.tail, 0);
                self.tail -= self.head;
                self.head = 0;
                self.buf.resize(total.max(READ_CHUNK), 0);
            }
            return Ok(None);
        }
        let start = self.offset;
        let end = start + total as u64;
        let (fds, lost_fds) = match self.claim(start, end, header.nfds as usize) {
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

    // Pairs a frame at stream offsets `[s, e)` with its fds.
    fn claim(&mut self, s: u64, e: u64, k: usize) -> Result<(Vec<OwnedFd>, usize), WireError> {
        while let Some(b) = self.batches.front() {
            if b.end > s {
                break;
            }
            // A batch entirely before this frame was claimed by nobody.
            if b.truncated || b.fds.is_empty() {
                self.batches.pop_front();
                continue;
            }
            return Err(WireError::FdCountMismatch {
                announced: 0,
                received: b.fds.len(),
            });
        }
        if k == 0 {
            // A batch that ends inside this frame can be owned by no later
            // frame: its fds came with a frame that announced none. Fail now,
            // rather than deliver this frame and hold the fds until a next
            // frame or EOF that may never come.
            if matches!(self.batches.front(), Some(b) if b.end <= e) {
                let b = self.batches.pop_front().expect("front exists");
                if !b.truncated && !b.fds.is_empty() {
                    return Err(WireError::FdCountMismatch {
                        announced: 0,
                        received: b.fds.len(),
                    });
                }
            }
            return Ok((Vec::new(), 0));
        }
        let announced = k as u16;
        match self.batches.front() {
            Some(b) if b.start <= s && s < b.end => {
                let b = self.batches.pop_front().expect("front exists");
                if b.truncated {
                    return Ok((Vec::new(), k));
                }
                if b.fds.len() != k {
                    return Err(WireError::FdCountMismatch {
                        announced,
                        received: b.fds.len(),
                    });
                }
                Ok((b.fds, 0))
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

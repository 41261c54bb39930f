//! [`CrashBackend`]: a redb storage backend that simulates power loss and failing disks.
//!
//! It keeps two images of the file: `live` (every write lands here at once, as in the OS page
//! cache) and `durable` (what a completed `sync_data` has made safe). Writes since the last
//! sync are also kept in order, so a crash image can keep a random subset of them — the page
//! cache may have written any of them back before power went. An I/O countdown makes every
//! operation fail once it runs out, and freezes `durable` from then on: a disk that died.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

/// What survives a simulated power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashImage {
    /// Only bytes a completed `sync_data` made durable.
    DurableOnly,
    /// The durable bytes plus the unsynced writes that the seeded choice keeps (each write
    /// whole or not at all, in order).
    Torn(u64),
    /// Every write, synced or not: the page cache wrote all of them back before power went.
    AllWritten,
}

#[derive(Debug, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last completed sync: (offset, bytes).
    pending: Vec<(u64, Vec<u8>)>,
    /// I/O operations (reads excluded) left before the disk dies; `None`: never.
    countdown: Option<u64>,
    /// Syncs left before one fails (or panics, if `panic_at_sync`) and the disk dies (the
    /// writes before it stay unsynced).
    syncs_before_failure: Option<u64>,
    panic_at_sync: bool,
    /// The disk has died: every operation fails.
    failed: bool,
    writes: u64,
    syncs: u64,
}

impl State {
    /// Counts one operation against the countdown; fails once it has run out.
    fn tick(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(dead());
        }
        if let Some(left) = self.countdown.as_mut() {
            if *left == 0 {
                self.failed = true;
                return Err(dead());
            }
            *left -= 1;
        }
        Ok(())
    }
}

fn dead() -> io::Error {
    io::Error::other("simulated I/O failure")
}

/// A redb [`StorageBackend`](redb::StorageBackend) for crash tests. Clones share one file.
#[derive(Debug, Clone, Default)]
pub struct CrashBackend {
    state: Arc<Mutex<State>>,
}

impl CrashBackend {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// A file holding `bytes`, all of them durable (what a disk holds after a reboot).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let state = State {
            live: bytes.clone(),
            durable: bytes,
            ..State::default()
        };
        CrashBackend {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// After `ops` more writes, length changes and syncs, every I/O operation fails.
    pub fn fail_after(&self, ops: u64) {
        self.state.lock().countdown = Some(ops);
    }

    /// Sync number `nth` from now (1: the next) fails, and every operation after it: the
    /// disk dies after the writes before it, which stay unsynced for a power loss to keep or
    /// drop. (A commit of the ledger's syncs twice; failing its second sync leaves the
    /// header that makes it durable written, not synced.)
    pub fn fail_sync(&self, nth: u64) {
        let mut s = self.state.lock();
        s.syncs_before_failure = Some(nth.saturating_sub(1));
        s.panic_at_sync = false;
    }

    /// As [`fail_sync`](Self::fail_sync), but the sync panics (a bug in the storage stack)
    /// instead of failing.
    pub fn panic_at_sync(&self, nth: u64) {
        let mut s = self.state.lock();
        s.syncs_before_failure = Some(nth.saturating_sub(1));
        s.panic_at_sync = true;
    }

    /// The disk dies now: every later operation fails.
    pub fn kill(&self) {
        self.state.lock().failed = true;
    }

    /// Whether the countdown has run out.
    pub fn has_failed(&self) -> bool {
        self.state.lock().failed
    }

    /// Writes and syncs so far (for choosing a countdown).
    pub fn io_counts(&self) -> (u64, u64) {
        let s = self.state.lock();
        (s.writes, s.syncs)
    }

    /// The file as a reboot after a power loss now would find it, as a new backend. The
    /// old backend keeps working (a process that has not noticed yet).
    pub fn power_loss(&self, image: CrashImage) -> CrashBackend {
        CrashBackend::from_bytes(self.crash_image(image))
    }

    /// The bytes that survive a power loss now.
    pub fn crash_image(&self, image: CrashImage) -> Vec<u8> {
        let s = self.state.lock();
        if image == CrashImage::AllWritten {
            return s.live.clone();
        }
        let mut bytes = s.durable.clone();
        if let CrashImage::Torn(seed) = image {
            let mut rng = seed | 1;
            for (offset, data) in &s.pending {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if rng & 1 == 0 {
                    continue;
                }
                let start = *offset as usize;
                if bytes.len() < start + data.len() {
                    bytes.resize(start + data.len(), 0);
                }
                bytes[start..start + data.len()].copy_from_slice(data);
            }
        }
        bytes
    }

    /// The live bytes (what the running process sees).
    pub fn live_bytes(&self) -> Vec<u8> {
        self.state.lock().live.clone()
    }
}

impl redb::StorageBackend for CrashBackend {
    fn len(&self) -> io::Result<u64> {
        let s = self.state.lock();
        if s.failed {
            return Err(dead());
        }
        Ok(s.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock();
        if s.failed {
            return Err(dead());
        }
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        let source = s
            .live
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        let len = usize::try_from(len).map_err(|_| io::Error::other("length"))?;
        s.live.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        match s.syncs_before_failure {
            Some(0) => {
                s.failed = true;
                s.syncs_before_failure = None;
                if s.panic_at_sync {
                    drop(s);
                    panic!("simulated panic at a sync");
                }
            }
            Some(left) => s.syncs_before_failure = Some(left - 1),
            None => {}
        }
        s.tick()?;
        s.syncs += 1;
        s.durable = s.live.clone();
        s.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        s.writes += 1;
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        if s.live.len() < start + data.len() {
            s.live.resize(start + data.len(), 0);
        }
        s.live[start..start + data.len()].copy_from_slice(data);
        s.pending.push((offset, data.to_vec()));
        Ok(())
    }
}

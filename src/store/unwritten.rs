//! [`Unwritten`]: a database file as `check` shows it to redb, which must change nothing in
//! it. redb opens a file for writing: it repairs one not closed cleanly, and its integrity
//! check writes a commit header. Here reads come from the file and writes stay in memory, so
//! a check leaves the file byte for byte as it was — a second check finds what the first did,
//! and a backup can be checked in place, even a read-only one. redb's locks on the file are
//! taken shared: a ledger holding the file open refuses the check (and is refused while it
//! runs), and two checks may run at once.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Bytes per page of the in-memory copy of what was written.
const PAGE: usize = 4096;

/// A file whose writes stay in memory. Clones share them.
#[derive(Debug, Clone)]
pub(crate) struct Unwritten(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    file: FileBackend,
    written: Mutex<Written>,
}

#[derive(Debug)]
struct Written {
    /// The length redb sees.
    len: u64,
    /// Below this, a page not written reads the file's bytes; above it, zeros (beyond the
    /// file's end, or once redb shortened the view below it).
    file_len: u64,
    /// Pages written, by index.
    pages: HashMap<u64, Box<[u8]>>,
}

impl Unwritten {
    /// A view of `file` (opened for reading).
    pub(crate) fn new(file: File) -> io::Result<Unwritten> {
        let len = file.metadata()?.len();
        let file = FileBackend::new(file).map_err(io::Error::other)?;
        let written = Written {
            len,
            file_len: len,
            pages: HashMap::new(),
        };
        Ok(Unwritten(Arc::new(Inner {
            file,
            written: Mutex::new(written),
        })))
    }
}

impl Written {
    /// Reads bytes of the view at `at` that lie in no written page.
    fn read_file(&self, file: &FileBackend, at: u64, out: &mut [u8]) -> io::Result<()> {
        let from_file = self.file_len.saturating_sub(at).min(out.len() as u64) as usize;
        if from_file > 0 {
            file.read(at, &mut out[..from_file])?;
        }
        out[from_file..].fill(0);
        Ok(())
    }
}

/// The page of `at`, the offset of `at` in it, and how many of `left` bytes it holds.
fn split(at: u64, left: usize) -> (u64, usize, usize) {
    let within = (at % PAGE as u64) as usize;
    (at / PAGE as u64, within, (PAGE - within).min(left))
}

impl StorageBackend for Unwritten {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.written.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let written = self.0.written.lock();
        if offset
            .checked_add(out.len() as u64)
            .is_none_or(|end| end > written.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        let mut done = 0;
        while done < out.len() {
            let at = offset + done as u64;
            let (page, within, n) = split(at, out.len() - done);
            let out = &mut out[done..done + n];
            match written.pages.get(&page) {
                Some(bytes) => out.copy_from_slice(&bytes[within..within + n]),
                None => written.read_file(&self.0.file, at, out)?,
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut written = self.0.written.lock();
        if len < written.len {
            written.file_len = written.file_len.min(len);
            let last = len.div_ceil(PAGE as u64);
            written.pages.retain(|&page, _| page < last);
            let tail = (len % PAGE as u64) as usize;
            if let Some(bytes) = written.pages.get_mut(&(len / PAGE as u64)) {
                bytes[tail..].fill(0);
            }
        }
        written.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut written = self.0.written.lock();
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (page, within, n) = split(at, data.len() - done);
            if !written.pages.contains_key(&page) {
                let mut bytes = vec![0; PAGE].into_boxed_slice();
                written.read_file(&self.0.file, page * PAGE as u64, &mut bytes)?;
                written.pages.insert(page, bytes);
            }
            let bytes = written.pages.get_mut(&page).expect("inserted");
            bytes[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        written.len = written.len.max(offset + data.len() as u64);
        Ok(())
    }

    /// Keeps the file and its locks until the last clone is dropped: `check` opens it twice.
    fn close(&self) -> io::Result<()> {
        Ok(())
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.file.try_lock_shared_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.file.lock_shared_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap().write_all(bytes).unwrap();
        (dir, path)
    }

    fn read(view: &Unwritten, at: u64, n: usize) -> Vec<u8> {
        let mut out = vec![0xAA; n];
        view.read(at, &mut out).unwrap();
        out
    }

    /// What redb writes is read back across page boundaries, the file's bytes show around
    /// it, shortening and growing again reads zeros, and the file is never changed.
    #[test]
    fn writes_stay_in_memory_and_read_back() {
        let original: Vec<u8> = (0..3 * PAGE + 100).map(|i| i as u8).collect();
        let (_dir, path) = file_of(&original);
        let view = Unwritten::new(File::open(&path).unwrap()).unwrap();
        let other = view.clone();
        view.write(PAGE as u64 - 2, &[1, 2, 3, 4]).unwrap();
        let mut expected = original.clone();
        expected[PAGE - 2..PAGE + 2].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            read(&other, 0, expected.len()),
            expected,
            "clones share writes"
        );

        view.set_len(PAGE as u64 + 1).unwrap();
        view.set_len(2 * PAGE as u64).unwrap();
        assert_eq!(read(&view, PAGE as u64 - 2, 3), [1, 2, 3]);
        assert_eq!(
            read(&view, PAGE as u64 + 1, 10),
            [0; 10],
            "cut, then grown: zeros"
        );
        assert_eq!(read(&view, 2 * PAGE as u64 - 3, 3), [0; 3]);
        assert!(
            view.read(2 * PAGE as u64 - 1, &mut [0; 2]).is_err(),
            "past the end"
        );

        view.write(5 * PAGE as u64, &[9]).unwrap();
        assert_eq!(view.len().unwrap(), 5 * PAGE as u64 + 1);
        assert_eq!(read(&view, 4 * PAGE as u64, 2), [0, 0]);
        drop((view, other));
        assert!(
            std::fs::read(&path).unwrap() == original,
            "the file as it was"
        );
    }
}

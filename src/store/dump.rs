//! Streaming NAR serializer over a physical directory tree: the bytes of
//! `nix-store --dump`, produced lazily.
//!
//! [`NarDump`] implements `Read`. It walks the tree with a stack of sorted
//! directory listings, frames entries from a small internal buffer, and reads
//! file contents straight into the caller's buffer, so memory stays O(depth +
//! widest directory) whatever the size of the files. A file whose length
//! differs from what `lstat` said when it was opened is an error, never a
//! silently different stream. [`nar_size`] computes the exact length from
//! metadata alone, and [`NarDump::skip`] seeks for HTTP Range requests.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Nix serializes a regular file as executable if its owner may execute it.
const OWNER_EXEC: u32 = 0o100;

/// The length of a NAR string: u64 length, bytes, zero padding to 8.
fn str_len(len: u64) -> u64 {
    8 + len.div_ceil(8) * 8
}

fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// What a node is, from `lstat`.
enum Node {
    Regular { executable: bool, size: u64 },
    Symlink { target: OsString },
    Directory,
}

fn node(path: &Path) -> io::Result<Node> {
    let meta = fs::symlink_metadata(path)?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(Node::Regular {
            executable: meta.permissions().mode() & OWNER_EXEC != 0,
            size: meta.len(),
        })
    } else if kind.is_symlink() {
        Ok(Node::Symlink {
            target: fs::read_link(path)?.into_os_string(),
        })
    } else if kind.is_dir() {
        Ok(Node::Directory)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: not a regular file, symlink or directory",
                path.display()
            ),
        ))
    }
}

/// Directory entries in the byte order Nix sorts them in.
fn sorted_entries(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    crate::order::sort_by(&mut names, |a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// The exact NAR length of `path`, from metadata only.
pub fn nar_size(path: &Path) -> io::Result<u64> {
    Ok(str_len(13) + node_size(path)?)
}

fn node_size(path: &Path) -> io::Result<u64> {
    // "(" "type" <type> ... ")"
    let frame = str_len(1) + str_len(4);
    Ok(match node(path)? {
        Node::Regular { executable, size } => {
            frame
                + str_len(7)
                + if executable {
                    str_len(10) + str_len(0)
                } else {
                    0
                }
                + str_len(8)
                + str_len(size)
                + str_len(1)
        }
        Node::Symlink { target } => {
            frame + str_len(7) + str_len(6) + str_len(target.len() as u64) + str_len(1)
        }
        Node::Directory => {
            let mut total = frame + str_len(9) + str_len(1);
            for name in sorted_entries(path)? {
                // "entry" "(" "name" <name> "node" <node> ")"
                total += str_len(5)
                    + str_len(1)
                    + str_len(4)
                    + str_len(name.len() as u64)
                    + str_len(4)
                    + node_size(&path.join(&name))?
                    + str_len(1);
            }
            total
        }
    })
}

/// One directory being walked: its path and the entries not yet emitted.
struct DirFrame {
    path: PathBuf,
    entries: std::vec::IntoIter<OsString>,
}

/// The file whose contents are being streamed.
struct OpenFile {
    file: File,
    path: PathBuf,
    left: u64,
    padding: usize,
}

pub struct NarDump {
    /// Framing bytes ready to be handed out, from `pending_pos` on.
    pending: Vec<u8>,
    pending_pos: usize,
    file: Option<OpenFile>,
    stack: Vec<DirFrame>,
    /// The root node still has to be emitted.
    root: Option<PathBuf>,
}

impl NarDump {
    pub fn open(path: &Path) -> io::Result<NarDump> {
        // Fail early, before any byte is produced, if the root is unusable.
        node(path)?;
        let mut pending = Vec::with_capacity(256);
        push_str(&mut pending, b"nix-archive-1");
        Ok(NarDump {
            pending,
            pending_pos: 0,
            file: None,
            stack: Vec::new(),
            root: Some(path.to_path_buf()),
        })
    }

    /// Emits the opening of the node at `path` into `pending`, and opens
    /// its file or pushes its directory.
    fn start_node(&mut self, path: PathBuf) -> io::Result<()> {
        let out = &mut self.pending;
        push_str(out, b"(");
        push_str(out, b"type");
        let mut node_closed = false;
        match node(&path)? {
            Node::Regular { executable, size } => {
                push_str(out, b"regular");
                if executable {
                    push_str(out, b"executable");
                    push_str(out, b"");
                }
                push_str(out, b"contents");
                out.extend_from_slice(&size.to_le_bytes());
                let file = File::open(&path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                self.file = Some(OpenFile {
                    file,
                    path,
                    left: size,
                    padding: padding(size),
                });
            }
            Node::Symlink { target } => {
                push_str(out, b"symlink");
                push_str(out, b"target");
                push_str(out, target.as_bytes());
                push_str(out, b")");
                node_closed = true;
            }
            Node::Directory => {
                push_str(out, b"directory");
                let entries = sorted_entries(&path)?;
                self.stack.push(DirFrame {
                    path,
                    entries: entries.into_iter(),
                });
            }
        }
        if node_closed {
            self.close_entry();
        }
        Ok(())
    }

    /// Refills `pending` with the next framing; false at the end of the NAR.
    fn advance(&mut self) -> io::Result<bool> {
        self.pending.clear();
        self.pending_pos = 0;
        if let Some(root) = self.root.take() {
            self.start_node(root)?;
            return Ok(true);
        }
        let Some(frame) = self.stack.last_mut() else {
            return Ok(false);
        };
        match frame.entries.next() {
            Some(name) => {
                let path = frame.path.join(&name);
                let out = &mut self.pending;
                push_str(out, b"entry");
                push_str(out, b"(");
                push_str(out, b"name");
                push_str(out, name.as_bytes());
                push_str(out, b"node");
                self.start_node(path)?;
            }
            None => {
                self.stack.pop();
                push_str(&mut self.pending, b")");
                self.close_entry();
            }
        }
        Ok(true)
    }

    /// After a node ends: inside a directory, the entry's `)` follows.
    fn close_entry(&mut self) {
        if !self.stack.is_empty() {
            push_str(&mut self.pending, b")");
        }
    }

    /// Called when a file's contents are done: its padding and closing.
    fn finish_file(&mut self, padding: usize) {
        self.pending.clear();
        self.pending_pos = 0;
        self.pending.resize(padding, 0);
        push_str(&mut self.pending, b")");
        self.close_entry();
    }

    /// Advances the stream by `n` bytes, seeking over file contents.
    pub fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            if let Some(open) = &mut self.file
                && self.pending_pos >= self.pending.len()
            {
                let step = n.min(open.left);
                if step > 0 {
                    open.file.seek(SeekFrom::Current(step as i64))?;
                    open.left -= step;
                    n -= step;
                    continue;
                }
            }
            let want = usize::try_from(n).unwrap_or(usize::MAX).min(scratch.len());
            match self.read(&mut scratch[..want])? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "range starts past the end of the NAR",
                    ));
                }
                got => n -= got as u64,
            }
        }
        Ok(())
    }
}

/// Files at least this large are handed to the kernel by [`NarDump::send_to`].
const SENDFILE_MIN: u64 = 64 * 1024;
/// What [`NarDump::send_to`] gathers small files and NAR framing into.
const SEND_BUFFER: usize = 64 * 1024;

impl NarDump {
    /// Writes exactly `len` more bytes of the stream to `socket`. Contents of
    /// large files go by `sendfile`, skipping the copy through user space;
    /// everything else is gathered in one buffer so small files do not become
    /// small packets. (std's `io::copy` will not use sendfile from a file to
    /// a socket, because later writes to the file could show through; store
    /// files are immutable, and the client checks the NarHash regardless.)
    /// `before_send` runs before each write or sendfile: the caller's place
    /// to enforce a deadline on the whole response.
    pub fn send_to(
        &mut self,
        socket: &TcpStream,
        mut len: u64,
        before_send: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut socket = socket;
        let mut buf = vec![0u8; SEND_BUFFER];
        let mut filled = 0;
        while len > 0 {
            let large_file = self.pending_pos >= self.pending.len()
                && self.file.as_ref().is_some_and(|f| f.left >= SENDFILE_MIN);
            if large_file && let Some(open) = &mut self.file {
                before_send()?;
                socket.write_all(&buf[..filled])?;
                filled = 0;
                before_send()?;
                let want = usize::try_from(open.left.min(len).min(1 << 30)).unwrap_or(1 << 30);
                let sent = match rustix::fs::sendfile(socket, &open.file, None, want) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{}: file shrank while being served", open.path.display()),
                        ));
                    }
                    Ok(sent) => sent as u64,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                open.left -= sent;
                len -= sent;
                continue;
            }
            if filled == buf.len() {
                before_send()?;
                socket.write_all(&buf)?;
                filled = 0;
            }
            let room = (buf.len() - filled).min(usize::try_from(len).unwrap_or(usize::MAX));
            let n = self.read(&mut buf[filled..filled + room])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("NAR ended {len} bytes early"),
                ));
            }
            filled += n;
            len -= n as u64;
        }
        before_send()?;
        socket.write_all(&buf[..filled])
    }
}

impl Read for NarDump {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pending_pos < self.pending.len() {
                let n = buf.len().min(self.pending.len() - self.pending_pos);
                buf[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
                self.pending_pos += n;
                return Ok(n);
            }
            if let Some(open) = &mut self.file {
                if open.left > 0 {
                    let want = usize::try_from(open.left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    let n = open.file.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{}: file shrank while being served", open.path.display()),
                        ));
                    }
                    open.left -= n as u64;
                    return Ok(n);
                }
                // The file must end exactly where lstat said it would.
                let mut probe = [0u8; 1];
                if open.file.read(&mut probe)? != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: file grew while being served", open.path.display()),
                    ));
                }
                let padding = open.padding;
                self.file = None;
                self.finish_file(padding);
                continue;
            }
            if !self.advance()? {
                return Ok(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peerix-dump-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn nix_store_dump(path: &Path) -> Vec<u8> {
        let out = Command::new("nix-store")
            .arg("--dump")
            .arg(path)
            .env("NIX_REMOTE", "")
            .output()
            .expect("nix-store is installed (apt-get install nix-bin)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn dump_with(path: &Path, chunk: usize) -> Vec<u8> {
        let mut dump = NarDump::open(path).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = dump.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// A tree with every kind of node Nix serializes, and awkward names.
    fn realistic_tree(root: &Path) {
        let w = |p: &str, data: &[u8]| fs::write(root.join(p), data).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        w("bin/tool", b"#!/bin/sh\necho hi\n");
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        w("empty", b"");
        w("seven__", b"1234567");
        w("eight___", b"12345678");
        w("name with spaces", b"x");
        w("\u{e9}t\u{e9}", b"unicode");
        w("Zupper", b"sorts before lowercase");
        fs::create_dir_all(root.join("empty-dir")).unwrap();
        let mut deep = root.join("deep");
        for i in 0..40 {
            deep = deep.join(format!("d{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("leaf"), b"deep").unwrap();
        symlink("bin/tool", root.join("relative-link")).unwrap();
        symlink("/etc/hostname", root.join("absolute-link")).unwrap();
        symlink("does/not/exist", root.join("dangling-link")).unwrap();
        let big: Vec<u8> = (0..3_000_017u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        w("big.bin", &big);
    }

    #[test]
    fn identical_to_nix_store_dump() {
        let dir = temp_dir("tree");
        realistic_tree(&dir.0);
        let expected = nix_store_dump(&dir.0);
        for chunk in [1, 7, 4096, 65536, 1 << 20] {
            assert!(
                dump_with(&dir.0, chunk) == expected,
                "chunk size {chunk} differs from nix-store --dump"
            );
        }
        assert_eq!(nar_size(&dir.0).unwrap(), expected.len() as u64);
        let mut validator = crate::nix::nar::NarValidator::new();
        validator.feed(&expected).unwrap();
        validator.finish().unwrap();
    }

    #[test]
    fn single_file_and_symlink_roots() {
        let dir = temp_dir("roots");
        let file = dir.0.join("file");
        fs::write(&file, b"hello").unwrap();
        let link = dir.0.join("link");
        symlink("file", &link).unwrap();
        for root in [&file, &link] {
            let expected = nix_store_dump(root);
            assert_eq!(dump_with(root, 4096), expected);
            assert_eq!(nar_size(root).unwrap(), expected.len() as u64);
        }
    }

    #[test]
    fn send_to_stops_when_before_send_refuses() {
        let dir = temp_dir("send-refused");
        realistic_tree(&dir.0);
        let len = nar_size(&dir.0).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _receiver = listener.accept().unwrap();
        let mut dump = NarDump::open(&dir.0).unwrap();
        let e = dump
            .send_to(&socket, len, &mut || {
                Err(io::Error::new(io::ErrorKind::TimedOut, "deadline"))
            })
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn send_to_a_socket_equals_reading() {
        let dir = temp_dir("send");
        realistic_tree(&dir.0);
        let full = dump_with(&dir.0, 65536);
        let len = full.len() as u64;
        for start in [0, 1000, len / 2] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let socket = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut receiver, _) = listener.accept().unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                receiver.read_to_end(&mut got).unwrap();
                got
            });
            let mut dump = NarDump::open(&dir.0).unwrap();
            dump.skip(start).unwrap();
            let mut sends = 0;
            dump.send_to(&socket, len - start, &mut || {
                sends += 1;
                Ok(())
            })
            .unwrap();
            assert!(sends > 0);
            drop(socket);
            assert!(
                reader.join().unwrap() == full[start as usize..],
                "from {start}"
            );
        }
    }

    #[test]
    fn skip_equals_read_and_discard() {
        let dir = temp_dir("skip");
        realistic_tree(&dir.0);
        let full = dump_with(&dir.0, 65536);
        let len = full.len() as u64;
        for start in [0, 1, 8, 100, 1000, 5000, len / 2, len - 9, len - 1, len] {
            let mut dump = NarDump::open(&dir.0).unwrap();
            dump.skip(start).unwrap();
            let mut rest = Vec::new();
            dump.read_to_end(&mut rest).unwrap();
            assert!(rest == full[start as usize..], "skip({start})");
        }
        let mut dump = NarDump::open(&dir.0).unwrap();
        assert!(dump.skip(len + 1).is_err());
    }

    #[test]
    fn a_file_that_changes_size_is_an_error() {
        let dir = temp_dir("change");
        fs::write(dir.0.join("a"), vec![1u8; 100_000]).unwrap();
        let mut dump = NarDump::open(&dir.0).unwrap();
        let mut buf = [0u8; 512];
        // Read into the file contents, then truncate the file under the dump.
        let mut got = 0;
        while got < 300 {
            got += dump.read(&mut buf).unwrap();
        }
        fs::write(dir.0.join("a"), b"short").unwrap();
        let mut rest = Vec::new();
        assert!(dump.read_to_end(&mut rest).is_err());
    }

    #[test]
    fn special_files_are_refused() {
        assert!(NarDump::open(Path::new("/dev/null")).is_err());
        assert!(nar_size(Path::new("/dev/null")).is_err());
        assert!(NarDump::open(Path::new("/nonexistent/peerix")).is_err());
    }
}

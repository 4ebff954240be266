//! Telling systemd how the service is doing (`Type=notify`): `READY=1` once
//! the first scan is done, `STATUS=` lines, and `STOPPING=1`. Without
//! `NOTIFY_SOCKET` in the environment (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to systemd, if it
/// listens. A failure is logged: it must never stop the service.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket: its name follows a NUL, not an '@'.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        log::warn!("cannot notify systemd at {}: {e}", path.to_string_lossy());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_state_reaches_a_listening_socket() {
        let dir = std::env::temp_dir().join(format!("peerix-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Setting the variable in this process would need `unsafe` (edition
        // 2024): a child test process sends instead.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "notify::tests::child_sends", "--nocapture"])
            .env("NOTIFY_SOCKET", &path)
            .env("PEERIX_NOTIFY_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
        let mut buf = [0u8; 64];
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=test");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn child_sends() {
        if std::env::var_os("PEERIX_NOTIFY_CHILD").is_some() {
            super::notify("READY=1\nSTATUS=test");
        }
    }
}

//! Reaching the TCP socket behind a tiny_http request.
//!
//! tiny_http does not hand out its sockets, but two things need one: sending
//! a large NAR with `sendfile` instead of copying it through user space, and
//! aborting a response whose body cannot be completed (after a 200 with a
//! Content-Length, closing early is the only honest way to fail, so the
//! client sees a short read at once rather than waiting for bytes that will
//! never come). The socket is found among this process's own descriptors by
//! its two endpoints and duplicated with `pidfd_getfd` (Linux 5.6+). The
//! duplicate is the same socket: a shutdown through it reaches tiny_http's
//! reader and writer too.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;

use rustix::net::Shutdown;
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// A second handle on the connection between `local_port` here and `peer`.
pub fn connection_socket(local_port: u16, peer: SocketAddr) -> io::Result<TcpStream> {
    match find_socket(local_port, peer)? {
        Some(fd) => Ok(TcpStream::from(fd)),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no socket to {peer} found"),
        )),
    }
}

/// Shuts down the TCP connection between `local_port` on this host and `peer`.
pub fn abort_connection(local_port: u16, peer: SocketAddr) -> io::Result<()> {
    let socket = connection_socket(local_port, peer)?;
    rustix::net::shutdown(&socket, Shutdown::Both)?;
    Ok(())
}

/// [`abort_connection`] for a response in progress; a failure is logged, as
/// there is nothing more to do for that client.
pub fn abort_response(local_port: u16, client: Option<SocketAddr>) {
    if let Some(client) = client
        && let Err(e) = abort_connection(local_port, client)
    {
        log::error!("could not abort the connection to {client}: {e}");
    }
}

/// This process's socket whose peer is `peer` and whose local port is `local_port`.
fn find_socket(local_port: u16, peer: SocketAddr) -> io::Result<Option<OwnedFd>> {
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|target| {
            target
                .as_os_str()
                .as_encoded_bytes()
                .starts_with(b"socket:")
        });
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // The descriptor may have been closed since the listing: skip it then.
        let Ok(dup) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let endpoint = |addr: Option<rustix::net::SocketAddrAny>| {
            addr.and_then(|a| SocketAddr::try_from(a).ok())
        };
        let peer_matches = endpoint(rustix::net::getpeername(&dup).ok().flatten())
            .is_some_and(|p| same_endpoint(p, peer));
        let local_matches =
            endpoint(rustix::net::getsockname(&dup).ok()).is_some_and(|l| l.port() == local_port);
        if peer_matches && local_matches {
            return Ok(Some(dup));
        }
    }
    Ok(None)
}

/// IPv4 peers of a dual-stack socket show up as IPv4-mapped IPv6.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |s: SocketAddr| (s.ip().to_canonical(), s.port());
    canonical(a) == canonical(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn shuts_down_the_connection_it_names_and_no_other() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut other = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server_side, peer) = listener.accept().unwrap();
        let (_other_server_side, _) = listener.accept().unwrap();

        abort_connection(port, peer).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the aborted client sees EOF"
        );
        other
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        assert!(
            other.read(&mut buf).is_err(),
            "the other connection stays open"
        );
        let nobody = SocketAddr::from(([127, 0, 0, 1], 1));
        assert!(abort_connection(port, nobody).is_err());
    }
}

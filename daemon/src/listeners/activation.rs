//! Socket activation: listening sockets systemd opened for phi3d (`phi3d.socket`), passed as
//! descriptors 3, 4, … with `LISTEN_FDS` / `LISTEN_PID`. systemd owns them: phi3d never
//! unlinks a passed Unix socket, so a restart finds it still there and no connection is lost.

use std::os::fd::{FromRawFd, RawFd};

use tokio::net::{TcpListener, UnixListener};

/// The sockets systemd passed, sorted by kind.
pub struct Passed {
    pub tcp: Vec<TcpListener>,
    pub unix: Vec<UnixListener>,
}

/// `None` when phi3d was not socket-activated.
pub fn passed_listeners() -> anyhow::Result<Option<Passed>> {
    // sd-notify checks LISTEN_PID against this process, so descriptors meant for a parent
    // are never taken.
    let descriptors: Vec<RawFd> = sd_notify::listen_fds()
        .map_err(|err| anyhow::anyhow!("socket activation: LISTEN_FDS is not usable: {err}"))?
        .collect();
    if descriptors.is_empty() {
        return Ok(None);
    }
    let mut passed = Passed { tcp: Vec::new(), unix: Vec::new() };
    for fd in descriptors {
        match socket_domain(fd)? {
            libc::AF_UNIX => {
                let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
                listener.set_nonblocking(true)?;
                passed.unix.push(UnixListener::from_std(listener)?);
            }
            libc::AF_INET | libc::AF_INET6 => {
                let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
                listener.set_nonblocking(true)?;
                passed.tcp.push(TcpListener::from_std(listener)?);
            }
            other => anyhow::bail!(
                "socket activation: descriptor {fd} is a socket of family {other}; phi3d.socket may only pass \
                 TCP (ListenStream=HOST:PORT) and Unix (ListenStream=/path) stream sockets"
            ),
        }
    }
    Ok(Some(passed))
}

/// The address family of a listening stream socket, or an error saying what it is instead.
fn socket_domain(fd: RawFd) -> anyhow::Result<i32> {
    let option = |name: libc::c_int| -> std::io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut value).cast(), &mut length) };
        if rc == 0 { Ok(value) } else { Err(std::io::Error::last_os_error()) }
    };
    let not_listening = |what: String| {
        anyhow::anyhow!(
            "socket activation: descriptor {fd} {what}; phi3d.socket must pass listening stream sockets \
             (ListenStream=, Accept=no)"
        )
    };
    if option(libc::SO_TYPE).map_err(|err| not_listening(format!("is not a socket ({err})")))? != libc::SOCK_STREAM {
        return Err(not_listening("is not a stream socket".into()));
    }
    if option(libc::SO_ACCEPTCONN)? == 0 {
        return Err(not_listening("is not listening".into()));
    }
    Ok(option(libc::SO_DOMAIN)?)
}

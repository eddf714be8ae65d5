//! `phi3d rpc-worker`: llama.cpp's RPC server for this board's devices, so that a `serve` on
//! another board places some of a model's layers here (its `rpc_workers`). Needs a llama.cpp
//! with the RPC backend (a build from source; not the portable packages).
//!
//! llama.cpp's RPC protocol has no authentication and no encryption, and llama.cpp calls its
//! server a proof of concept for trusted networks: whoever reaches the port can make this
//! process compute, read and write its memory. So the worker listens on loopback unless the
//! user names a private address of this machine and, with `--allow-rpc-on`, the interface or
//! private network that address must be on (a dedicated wired link, a WireGuard tunnel); it
//! never listens on every interface or on a public address. Linux still accepts packets for a
//! local address arriving on any interface, so the rule chooses the address; what lets only the
//! one daemon in is the systemd unit's IP filter (deploy/rpc/phi3d-rpc-worker.service) or a
//! firewall.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct RpcWorkerArgs {
    /// IPv4:PORT to listen on: loopback, or an address of this machine on the interface or
    /// network --allow-rpc-on names
    #[arg(long, env = "PHI3D_RPC_LISTEN", default_value = "127.0.0.1:50052")]
    listen: String,
    /// The interface (e.g. wg0, eth1) or IPv4 network (e.g. 10.8.0.0/24) a listen address that is
    /// not loopback must be on; without it only loopback is served
    #[arg(long, env = "PHI3D_ALLOW_RPC_ON")]
    allow_rpc_on: Option<String>,
    /// Threads llama.cpp's CPU backend computes with [default: the physical cores]
    #[arg(long, env = "PHI3D_RPC_THREADS")]
    threads: Option<usize>,
    /// A folder that keeps the tensors daemons sent, so that a restarted daemon sends only their
    /// hashes instead of the weights again
    #[arg(long, env = "PHI3D_RPC_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

pub fn run(args: RpcWorkerArgs) -> anyhow::Result<()> {
    let interfaces = interface_addresses();
    let listen = check_listen(&args.listen, args.allow_rpc_on.as_deref(), &interfaces).map_err(anyhow::Error::msg)?;
    if let Some(dir) = &args.cache_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cache folder {}", dir.display()))?;
    }
    let threads = args.threads.unwrap_or_else(num_cpus::get_physical).max(1);
    eprintln!(
        "phi3d rpc-worker on {listen} ({threads} threads): llama.cpp's RPC protocol is unauthenticated and \
         unencrypted; whoever reaches this port can run work in this process and read its memory. Keep it on \
         loopback, a dedicated link or a WireGuard tunnel, with only the daemon's address let in (deploy/README.md)."
    );
    crate::engine::rpc::serve_devices(&listen.to_string(), threads, args.cache_dir.as_deref()).map_err(anyhow::Error::msg)
}

/// The listen rule: an IPv4 address and a port (llama.cpp's server parses nothing else);
/// loopback always; any other address only when `allow` names the interface it belongs to or a
/// network holding it; never the unspecified address.
fn check_listen(listen: &str, allow: Option<&str>, interfaces: &[(String, Ipv4Addr)]) -> Result<SocketAddrV4, String> {
    let address: SocketAddrV4 = listen
        .parse()
        .map_err(|_| format!("--listen `{listen}` is not IPv4:PORT (e.g. 127.0.0.1:50052); llama.cpp's RPC server speaks IPv4 only"))?;
    if address.port() == 0 {
        return Err(format!("--listen `{listen}`: name a port (e.g. 50052), so that the daemon's rpc_workers can name it"));
    }
    let ip = *address.ip();
    if ip.is_loopback() {
        return Ok(address);
    }
    if ip.is_unspecified() {
        return Err(format!(
            "--listen `{listen}` would serve every network this machine is on, and the RPC protocol has no \
             authentication; name the address of the private link instead, with --allow-rpc-on"
        ));
    }
    if !is_private(ip) {
        return Err(format!(
            "--listen `{listen}` is not a private address (10/8, 172.16/12, 192.168/16, 100.64/10, 169.254/16), and \
             the RPC protocol has no authentication; put the boards on a private link"
        ));
    }
    let Some(allow) = allow else {
        return Err(format!(
            "--listen `{listen}` is not loopback, and the RPC protocol has no authentication; to serve another \
             board, add --allow-rpc-on with the interface (e.g. wg0) or network (e.g. 10.8.0.0/24) this address is on"
        ));
    };
    if allow.contains('/') {
        let (network, prefix) = parse_cidr(allow)?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(ip) & mask != u32::from(network) & mask {
            return Err(format!("--listen `{listen}` is not in --allow-rpc-on {allow}"));
        }
        return Ok(address);
    }
    let on_interface: Vec<Ipv4Addr> =
        interfaces.iter().filter(|(name, _)| name == allow).map(|(_, address)| *address).collect();
    if on_interface.is_empty() {
        let mut names: Vec<&str> = interfaces.iter().map(|(name, _)| name.as_str()).collect();
        names.dedup();
        return Err(format!(
            "--allow-rpc-on {allow}: no interface of that name has an IPv4 address (interfaces: {})",
            names.join(", ")
        ));
    }
    if !on_interface.contains(&ip) {
        return Err(format!(
            "--listen `{listen}` is not an address of {allow} (it has {})",
            on_interface.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(address)
}

fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u32), String> {
    let invalid = || format!("--allow-rpc-on `{text}` is neither an interface name nor an IPv4 network like 10.8.0.0/24");
    let (network, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let network: Ipv4Addr = network.parse().map_err(|_| invalid())?;
    let prefix: u32 = prefix.parse().map_err(|_| invalid())?;
    if prefix > 32 {
        return Err(invalid());
    }
    if prefix < 8 {
        return Err(format!("--allow-rpc-on `{text}` spans more than a private link; name a network of /8 or narrower"));
    }
    if !is_private(network) {
        return Err(format!("--allow-rpc-on `{text}` is not a private network (10/8, 172.16/12, 192.168/16, 100.64/10, 169.254/16)"));
    }
    Ok((network, prefix))
}

/// RFC 1918's networks, carrier-grade NAT's (Tailscale's addresses) and link-local ones.
fn is_private(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b))
}

/// Every interface's IPv4 addresses, by name (`getifaddrs`).
fn interface_addresses() -> Vec<(String, Ipv4Addr)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list and writes its head; it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let node = unsafe { &*entry };
        if !node.ifa_addr.is_null() && i32::from(unsafe { (*node.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in; the name is NUL-terminated.
            let ip = unsafe { (*(node.ifa_addr as *const libc::sockaddr_in)).sin_addr.s_addr };
            let name = unsafe { std::ffi::CStr::from_ptr(node.ifa_name) }.to_string_lossy().into_owned();
            addresses.push((name, Ipv4Addr::from(u32::from_be(ip))));
        }
        entry = node.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interfaces() -> Vec<(String, Ipv4Addr)> {
        vec![
            ("lo".into(), Ipv4Addr::LOCALHOST),
            ("eth0".into(), Ipv4Addr::new(192, 168, 1, 20)),
            ("wg0".into(), Ipv4Addr::new(10, 8, 0, 1)),
        ]
    }

    #[test]
    fn loopback_needs_nothing_else() {
        assert_eq!(check_listen("127.0.0.1:50052", None, &interfaces()).unwrap().port(), 50052);
        assert!(check_listen("127.0.0.2:50052", None, &interfaces()).is_ok());
    }

    #[test]
    fn another_address_needs_its_interface_or_network_named() {
        let refused = check_listen("10.8.0.1:50052", None, &interfaces()).unwrap_err();
        assert!(refused.contains("--allow-rpc-on") && refused.contains("no authentication"), "{refused}");
        assert!(check_listen("10.8.0.1:50052", Some("wg0"), &interfaces()).is_ok());
        assert!(check_listen("10.8.0.1:50052", Some("10.8.0.0/24"), &interfaces()).is_ok());
        let elsewhere = check_listen("192.168.1.20:50052", Some("wg0"), &interfaces()).unwrap_err();
        assert!(elsewhere.contains("not an address of wg0"), "{elsewhere}");
        let outside = check_listen("192.168.1.20:50052", Some("10.8.0.0/24"), &interfaces()).unwrap_err();
        assert!(outside.contains("not in"), "{outside}");
        let unknown = check_listen("10.8.0.1:50052", Some("wg9"), &interfaces()).unwrap_err();
        assert!(unknown.contains("interfaces: lo, eth0, wg0"), "{unknown}");
    }

    #[test]
    fn public_addresses_and_networks_are_refused() {
        let public = vec![("eth0".to_owned(), Ipv4Addr::new(203, 0, 113, 5))];
        assert!(check_listen("203.0.113.5:50052", Some("eth0"), &public).unwrap_err().contains("not a private address"));
        assert!(check_listen("203.0.113.5:50052", Some("203.0.113.0/24"), &public).is_err());
        assert!(check_listen("10.8.0.1:50052", Some("8.0.0.0/8"), &interfaces()).unwrap_err().contains("not a private network"));
        assert!(check_listen("100.101.1.2:50052", Some("100.64.0.0/10"), &interfaces()).is_ok());
    }

    #[test]
    fn every_interface_and_odd_addresses_are_refused() {
        for (listen, allow) in [("0.0.0.0:50052", Some("wg0")), ("0.0.0.0:50052", Some("0.0.0.0/0"))] {
            assert!(check_listen(listen, allow, &interfaces()).unwrap_err().contains("every network"), "{listen}");
        }
        assert!(check_listen("10.8.0.1:50052", Some("0.0.0.0/0"), &interfaces()).unwrap_err().contains("/8 or narrower"));
        assert!(check_listen("[::1]:50052", None, &interfaces()).unwrap_err().contains("IPv4"));
        assert!(check_listen("localhost:50052", None, &interfaces()).unwrap_err().contains("IPv4:PORT"));
        assert!(check_listen("127.0.0.1:0", None, &interfaces()).unwrap_err().contains("name a port"));
        assert!(check_listen("10.8.0.1:50052", Some("10.8.0.0/33"), &interfaces()).is_err());
    }
}

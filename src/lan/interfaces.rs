//! Which addresses are this host's, and where LAN queries are broadcast.
//!
//! Queries go to the broadcast address of every interface that is up and
//! has a private IPv4 address (RFC 1918): a home LAN, never the internet.
//! The selection is a pure function of the interface list, tested below.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

/// One IPv4 address of an interface, as the selection needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Interface {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub broadcast: Option<Ipv4Addr>,
    pub up: bool,
    pub loopback: bool,
}

/// The broadcast addresses to query, once each, in interface order.
pub fn broadcast_addresses(interfaces: &[Ipv4Interface]) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for iface in interfaces {
        // A /31 or /32 (point-to-point links, VPN tunnels) has no broadcast.
        if !iface.up || iface.loopback || !iface.ip.is_private() || iface.prefix_len > 30 {
            continue;
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(iface.prefix_len))
            .unwrap_or(0);
        let computed = Ipv4Addr::from(u32::from(iface.ip) | !mask);
        let broadcast = iface.broadcast.unwrap_or(computed);
        if !out.contains(&broadcast) {
            out.push(broadcast);
        }
    }
    out
}

/// This host's IPv4 interfaces, read from the kernel.
pub fn ipv4_interfaces() -> std::io::Result<Vec<Ipv4Interface>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .filter_map(|iface| match &iface.addr {
            if_addrs::IfAddr::V4(v4) => Some(Ipv4Interface {
                ip: v4.ip,
                prefix_len: v4.prefixlen,
                broadcast: v4.broadcast,
                up: iface.is_oper_up() || iface.is_loopback(),
                loopback: iface.is_loopback(),
            }),
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect())
}

/// Every address of this host, so its own broadcasts can be told apart.
pub fn own_addresses() -> std::io::Result<HashSet<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|iface| iface.ip())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(ip: [u8; 4], prefix_len: u8, up: bool) -> Ipv4Interface {
        Ipv4Interface {
            ip: Ipv4Addr::from(ip),
            prefix_len,
            broadcast: None,
            up,
            loopback: false,
        }
    }

    #[test]
    fn only_up_private_interfaces_with_room_for_a_broadcast() {
        let mut lo = iface([127, 0, 0, 1], 8, true);
        lo.loopback = true;
        let mut with_brd = iface([10, 77, 0, 2], 24, true);
        with_brd.broadcast = Some(Ipv4Addr::new(10, 77, 0, 255));
        let interfaces = [
            lo,
            with_brd,
            iface([192, 168, 1, 20], 24, true),
            iface([172, 16, 5, 1], 12, true),
            iface([192, 168, 2, 20], 24, false),
            iface([100, 100, 1, 1], 10, true),
            iface([8, 8, 8, 8], 24, true),
            iface([10, 1, 0, 1], 32, true),
            iface([10, 2, 0, 1], 31, true),
            iface([10, 77, 0, 3], 24, true),
        ];
        assert_eq!(
            broadcast_addresses(&interfaces),
            [
                Ipv4Addr::new(10, 77, 0, 255),
                Ipv4Addr::new(192, 168, 1, 255),
                Ipv4Addr::new(172, 31, 255, 255),
            ]
        );
    }

    #[test]
    fn this_machine_has_a_loopback_address() {
        assert!(
            own_addresses()
                .unwrap()
                .contains(&IpAddr::from([127, 0, 0, 1]))
        );
    }
}

//! Where a runner may be (DESIGN §4): the rules for the address a
//! registration names and for every address the gateway dials.
//!
//! Two checks, both pure:
//! - [`registration_host`] at `PUT`: the host is the request's source
//!   address, or another address inside `registration.runner_networks`.
//! - [`dialable`] at registration *and* before every TCP connect (job mode's
//!   SSH client, jump mode's forwards): never an unspecified, multicast,
//!   broadcast, reserved or link-local address (cloud metadata lives at
//!   169.254.169.254 and fd00:ec2::254), never an address and port the
//!   gateway itself listens on. IPv4-mapped (`::ffff:a.b.c.d`),
//!   IPv4-compatible (`::a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) forms are
//!   judged by the IPv4 address inside, so no spelling gets around a rule.
//!
//! No I/O here; the gateway's own sockets are passed in.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Deserializer};

/// An IP network, `10.0.0.0/16` or `fd00::/8`; a bare address is a /32 (/128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// Why a network was refused; each names the text it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an address or CIDR network")]
    NotAnAddress(String),
    #[error("{0:?}: the prefix length must be 0..={1}")]
    Prefix(String, u8),
    #[error("{text:?} has host bits set; did you mean {meant}?")]
    HostBits { text: String, meant: String },
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::NotAnAddress(text.into()))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::Prefix(text.into(), max))?,
        };
        if mask(net, prefix) != net {
            return Err(CidrError::HostBits {
                text: text.into(),
                meant: format!("{}/{prefix}", mask(net, prefix)),
            });
        }
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// Why an address is refused; one line, naming the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is not a unicast host address (unspecified, multicast, broadcast or reserved)")]
    NotUnicast(IpAddr),
    #[error("{0} is link-local (cloud metadata lives there); runners are never reached there")]
    LinkLocal(IpAddr),
    #[error("{0} is where the gateway itself listens")]
    Gateway(SocketAddr),
    #[error(
        "{host} is neither this request's source address ({from}) nor inside \
         registration.runner_networks ({networks})"
    )]
    OutsideNetworks {
        host: IpAddr,
        from: IpAddr,
        networks: String,
    },
}

/// The IPv4 address an IPv6 address stands for, if it embeds one.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::from(u128::from(v6) as u32));
    }
    // IPv4-compatible ::a.b.c.d (deprecated), but not :: and ::1.
    if s[..6] == [0; 6] && u128::from(v6) > 1 {
        return Some(Ipv4Addr::from(u128::from(v6) as u32));
    }
    None
}

/// The address class rules alone (no ports): what may never be a runner.
pub fn check_class(ip: IpAddr) -> Result<IpAddr, Refused> {
    let ip = ip.to_canonical();
    let judged = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match judged {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if o[0] == 0 || v4.is_multicast() || o[0] >= 240 {
                // 0.0.0.0/8 "this network", 224/4, 240/4 incl. 255.255.255.255
                return Err(Refused::NotUnicast(ip));
            }
            if o[0] == 169 && o[1] == 254 {
                return Err(Refused::LinkLocal(ip));
            }
        }
        IpAddr::V6(v6) => {
            let s0 = v6.segments()[0];
            if v6.is_unspecified() || v6.is_multicast() {
                return Err(Refused::NotUnicast(ip));
            }
            if s0 & 0xffc0 == 0xfe80 {
                return Err(Refused::LinkLocal(ip));
            }
            // AWS's IPv6 instance metadata endpoint.
            if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                return Err(Refused::LinkLocal(ip));
            }
        }
    }
    Ok(ip)
}

/// Whether the gateway may open a TCP connection to `addr`: the class rules
/// plus "not one of the gateway's own sockets" (`own`: the addresses it
/// listens on; an unspecified listen address covers its port everywhere).
/// Returns the canonical address to dial.
pub fn dialable(addr: SocketAddr, own: &[SocketAddr]) -> Result<SocketAddr, Refused> {
    let ip = check_class(addr.ip())?;
    let addr = SocketAddr::new(ip, addr.port());
    for o in own {
        let o_ip = o.ip().to_canonical();
        if o.port() == addr.port() && (o_ip.is_unspecified() || o_ip == ip) {
            return Err(Refused::Gateway(addr));
        }
    }
    Ok(addr)
}

/// The host a registration gets: `named` (the body's `host`) or else the
/// request's `source`. A named host other than the source must lie inside
/// `networks`. The class rules apply either way.
pub fn registration_host(
    named: Option<IpAddr>,
    source: IpAddr,
    networks: &[Cidr],
) -> Result<IpAddr, Refused> {
    let source = source.to_canonical();
    let host = named.map(|ip| ip.to_canonical()).unwrap_or(source);
    let host = check_class(host)?;
    if host != source && !networks.iter().any(|n| n.contains(host)) {
        return Err(Refused::OutsideNetworks {
            host,
            from: source,
            networks: if networks.is_empty() {
                "empty".into()
            } else {
                networks
                    .iter()
                    .map(Cidr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_address_class_table() {
        let refused = [
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "ff02::1",
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            // The same classes in other spellings.
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "64:ff9b::169.254.169.254",
            "::169.254.169.254",
            "::ffff:224.0.0.1",
        ];
        for r in refused {
            assert!(check_class(ip(r)).is_err(), "{r} must be refused");
        }
        let allowed = [
            "10.0.3.7",
            "192.168.1.2",
            "127.0.0.1",
            "::1",
            "2001:db8::5",
            "fd12::7",
            "fec0::1",
        ];
        for a in allowed {
            assert!(check_class(ip(a)).is_ok(), "{a} is a unicast host");
        }
        // Mapped forms come back canonical.
        assert_eq!(check_class(ip("::ffff:10.0.0.1")), Ok(ip("10.0.0.1")));
    }

    #[test]
    fn the_gateways_own_sockets_are_never_dialled_in_any_spelling() {
        let own: Vec<SocketAddr> = vec![
            "127.0.0.1:2222".parse().expect("a"),
            "[::1]:8022".parse().expect("a"),
            "0.0.0.0:9122".parse().expect("a"),
        ];
        for bad in [
            "127.0.0.1:2222",
            "[::ffff:127.0.0.1]:2222",
            "[::1]:8022",
            "10.1.2.3:9122",
            "127.0.0.1:9122",
        ] {
            let addr: SocketAddr = bad.parse().expect("addr");
            assert!(
                matches!(dialable(addr, &own), Err(Refused::Gateway(_))),
                "{bad}"
            );
        }
        for good in ["127.0.0.1:22", "127.0.0.2:2222", "[::1]:2222"] {
            let addr: SocketAddr = good.parse().expect("addr");
            assert!(dialable(addr, &own).is_ok(), "{good}");
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.5]:22".parse().expect("addr");
        assert_eq!(
            dialable(mapped, &own),
            Ok("127.0.0.5:22".parse().expect("addr"))
        );
    }

    #[test]
    fn a_named_host_must_be_the_source_or_inside_the_runner_networks() {
        let nets = vec![Cidr::parse("127.0.0.0/8").expect("net")];
        let source = ip("127.0.0.1");
        assert_eq!(registration_host(None, source, &nets), Ok(source));
        assert_eq!(
            registration_host(Some(ip("127.0.0.5")), source, &nets),
            Ok(ip("127.0.0.5"))
        );
        assert_eq!(
            registration_host(Some(ip("::ffff:127.0.0.9")), source, &nets),
            Ok(ip("127.0.0.9"))
        );
        for outside in ["10.0.0.1", "::1", "192.168.0.1"] {
            assert!(
                matches!(
                    registration_host(Some(ip(outside)), source, &nets),
                    Err(Refused::OutsideNetworks { .. })
                ),
                "{outside}"
            );
        }
        // The source itself is fine even outside the networks, but never a
        // forbidden class.
        assert_eq!(
            registration_host(None, ip("10.9.9.9"), &nets),
            Ok(ip("10.9.9.9"))
        );
        assert!(matches!(
            registration_host(Some(ip("169.254.169.254")), source, &[]),
            Err(Refused::LinkLocal(_))
        ));
        // A source in a mapped spelling compares as IPv4.
        assert_eq!(
            registration_host(Some(ip("10.9.9.9")), ip("::ffff:10.9.9.9"), &[]),
            Ok(ip("10.9.9.9"))
        );
    }

    #[test]
    fn cidr_parsing_and_membership() {
        let n = Cidr::parse("10.0.0.0/16").expect("net");
        assert!(n.contains(ip("10.0.255.1")));
        assert!(n.contains(ip("::ffff:10.0.0.1")));
        assert!(!n.contains(ip("10.1.0.0")));
        assert!(!n.contains(ip("::1")));
        let v6 = Cidr::parse("fd00::/8").expect("net");
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert_eq!(
            Cidr::parse("10.0.0.7").expect("host").to_string(),
            "10.0.0.7/32"
        );
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("all")
            .contains(ip("1.2.3.4")));
        for bad in ["10.0.0.1/16", "10.0.0.0/33", "nope", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}

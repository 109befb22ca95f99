//! Which network addresses a git URL may reach.
//!
//! A Project's git URL is chosen by a tenant, and the operator connects to
//! it from inside the cluster: without a check, a URL could probe the
//! cluster's own network, the node, or the cloud's metadata service
//! (`169.254.169.254`). So every address a git host resolves to is checked
//! against a [`HostPolicy`] before anything connects, and the connection then
//! goes to exactly the addresses that were checked (no second DNS lookup that
//! could answer differently; see `remote.rs` and `ssh.rs`).
//!
//! Refused by default ([`AddressClass`]): loopback (127.0.0.0/8, ::1),
//! link-local (169.254.0.0/16, fe80::/10), private ranges (10.0.0.0/8,
//! 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7, fec0::/10),
//! unspecified (0.0.0.0/8, ::), multicast (224.0.0.0/4, ff00::/8) and
//! reserved ranges (240.0.0.0/4 with the broadcast address, 192.0.0.0/24,
//! 198.18.0.0/15). IPv6 forms that embed an IPv4 address (IPv4-mapped,
//! IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) are judged by that
//! IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use super::GitError;

/// A kind of internal address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    Loopback,
    LinkLocal,
    Private,
    Unspecified,
    Multicast,
    Reserved,
}

impl AddressClass {
    /// The flag value that allows this class, if one does.
    fn flag(self) -> Option<&'static str> {
        match self {
            AddressClass::Loopback => Some("loopback"),
            AddressClass::LinkLocal => Some("link-local"),
            AddressClass::Private => Some("private"),
            _ => None,
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Loopback => "a loopback address",
            AddressClass::LinkLocal => {
                "a link-local address (where cloud metadata services answer)"
            }
            AddressClass::Private => "a private-network address",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Reserved => "a reserved address",
        })
    }
}

/// The class of an internal address, or `None` for an address on the
/// internet.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (169, 254, _) => AddressClass::LinkLocal,
        (10, _, _) => AddressClass::Private,
        (172, 16..=31, _) => AddressClass::Private,
        (192, 168, _) => AddressClass::Private,
        // Shared address space (carrier-grade NAT; some clusters use it for pods).
        (100, 64..=127, _) => AddressClass::Private,
        (224..=239, _, _) => AddressClass::Multicast,
        (240..=255, _, _) => AddressClass::Reserved,
        (192, 0, 0) => AddressClass::Reserved,
        (198, 18..=19, _) => AddressClass::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    if ip.is_unspecified() {
        return Some(AddressClass::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddressClass::Loopback);
    }
    let s = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d).
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return classify_v4(embedded(s[6], s[7]));
    }
    // NAT64 (64:ff9b::a.b.c.d) reaches the embedded IPv4 address.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded(s[6], s[7]));
    }
    // Local-use NAT64 (64:ff9b:1::/48).
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some(AddressClass::Private);
    }
    // 6to4 (2002:a.b.c.d::/48) routes to the embedded IPv4 address.
    if s[0] == 0x2002 {
        return classify_v4(embedded(s[1], s[2]));
    }
    Some(match s[0] {
        x if x & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        x if x & 0xffc0 == 0xfec0 => AddressClass::Private,
        x if x & 0xfe00 == 0xfc00 => AddressClass::Private,
        x if x & 0xff00 == 0xff00 => AddressClass::Multicast,
        _ => return None,
    })
}

/// An IP network in CIDR notation (`10.1.0.0/16`, `fd00::/8`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR network"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Network { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which internal addresses git URLs may reach; the default allows none.
///
/// Parsed from the operator's `--allow-internal-git-hosts` flag: `none`
/// (the default), or a comma-separated list of `loopback`, `link-local`,
/// `private`, CIDR networks or single addresses (`10.20.0.0/16`,
/// `fd12::/16`, `10.0.0.7`), or `all` (no check at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    all: bool,
    classes: Vec<AddressClass>,
    networks: Vec<Network>,
}

impl HostPolicy {
    /// Internal addresses refused (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// Loopback allowed (tests and `kapsa dev`, whose git servers run on
    /// this machine); every other internal address refused.
    pub fn loopback() -> Self {
        Self {
            classes: vec![AddressClass::Loopback],
            ..Self::default()
        }
    }

    /// No address refused.
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Whether `ip` may be reached; otherwise the class that refuses it.
    pub fn check(&self, ip: IpAddr) -> Result<(), AddressClass> {
        let ip = ip.to_canonical();
        match classify(ip) {
            None => Ok(()),
            Some(_) if self.all => Ok(()),
            Some(class) if self.classes.contains(&class) => Ok(()),
            Some(_) if self.networks.iter().any(|n| n.contains(ip)) => Ok(()),
            Some(class) => Err(class),
        }
    }
}

impl FromStr for HostPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut policy = HostPolicy::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.to_ascii_lowercase().as_str() {
                "none" => {}
                "all" => policy.all = true,
                "loopback" => policy.classes.push(AddressClass::Loopback),
                "link-local" => policy.classes.push(AddressClass::LinkLocal),
                "private" => policy.classes.push(AddressClass::Private),
                _ => policy.networks.push(item.parse().map_err(|e| {
                    format!(
                        "{e}; expected none, loopback, link-local, private, all or CIDR networks"
                    )
                })?),
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for HostPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.all {
            return f.write_str("all");
        }
        let items: Vec<String> = self
            .classes
            .iter()
            .filter_map(|c| c.flag().map(str::to_owned))
            .chain(self.networks.iter().map(Network::to_string))
            .collect();
        if items.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&items.join(","))
        }
    }
}

/// The addresses of `host` (a name or a literal IP, with or without IPv6
/// brackets) that `policy` allows, with `port`. A literal IP is not looked
/// up; a name is resolved once, here, and the caller connects to exactly
/// these addresses.
///
/// Errors: [`GitError::HostNotAllowed`] when every address is refused,
/// [`GitError::Unreachable`] when the name does not resolve.
pub(crate) fn allowed_addresses(
    host: &str,
    port: u16,
    policy: &HostPolicy,
) -> Result<Vec<SocketAddr>, GitError> {
    let (bare, literal) = bare_host(host);
    let resolved: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => (bare, port)
            .to_socket_addrs()
            .map_err(|e| unresolved(bare, e))?
            .collect(),
    };
    checked(bare, resolved, policy)
}

/// [`allowed_addresses`] for a caller on the runtime: a name is resolved
/// without blocking a worker thread (an address literal needs no lookup).
pub(crate) async fn allowed_addresses_async(
    host: &str,
    port: u16,
    policy: &HostPolicy,
) -> Result<Vec<SocketAddr>, GitError> {
    let (bare, literal) = bare_host(host);
    let resolved: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| unresolved(bare, e))?
            .collect(),
    };
    checked(bare, resolved, policy)
}

/// The host without an IPv6 literal's brackets, and its address if it is
/// an address literal (which needs no lookup).
fn bare_host(host: &str) -> (&str, Option<IpAddr>) {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    (bare, bare.parse().ok())
}

fn unresolved(bare: &str, error: std::io::Error) -> GitError {
    GitError::Unreachable(format!("cannot resolve {bare}: {error}"))
}

/// The addresses `bare` resolved to that `policy` allows, or why none is.
fn checked(
    bare: &str,
    resolved: Vec<SocketAddr>,
    policy: &HostPolicy,
) -> Result<Vec<SocketAddr>, GitError> {
    let mut allowed: Vec<SocketAddr> = Vec::new();
    let mut refused: Option<(IpAddr, AddressClass)> = None;
    for addr in resolved {
        match policy.check(addr.ip()) {
            Ok(()) if !allowed.contains(&addr) => allowed.push(addr),
            Ok(()) => {}
            Err(class) => {
                refused.get_or_insert((addr.ip(), class));
            }
        }
    }
    match (allowed.is_empty(), refused) {
        (false, _) => Ok(allowed),
        (true, Some((ip, class))) => {
            let target = if bare == ip.to_string() {
                format!("{ip} is {class}")
            } else {
                format!("{bare} resolves to {ip}, {class}")
            };
            Err(GitError::HostNotAllowed(format!(
                "{target}; git URLs may not reach internal addresses unless the operator allows them (--allow-internal-git-hosts{})",
                class.flag().map(|f| format!(" {f}")).unwrap_or_default()
            )))
        }
        (true, None) => Err(GitError::Unreachable(format!(
            "{bare} resolves to no address"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn classes() {
        for (text, class) in [
            ("127.0.0.1", Some(AddressClass::Loopback)),
            ("127.255.1.2", Some(AddressClass::Loopback)),
            ("::1", Some(AddressClass::Loopback)),
            ("169.254.169.254", Some(AddressClass::LinkLocal)),
            ("fe80::1", Some(AddressClass::LinkLocal)),
            ("febf::1", Some(AddressClass::LinkLocal)),
            ("10.0.0.1", Some(AddressClass::Private)),
            ("172.16.0.1", Some(AddressClass::Private)),
            ("172.31.255.255", Some(AddressClass::Private)),
            ("192.168.1.1", Some(AddressClass::Private)),
            ("100.64.0.1", Some(AddressClass::Private)),
            ("fc00::1", Some(AddressClass::Private)),
            ("fd12:3456::1", Some(AddressClass::Private)),
            ("0.0.0.0", Some(AddressClass::Unspecified)),
            ("0.1.2.3", Some(AddressClass::Unspecified)),
            ("::", Some(AddressClass::Unspecified)),
            ("224.0.0.1", Some(AddressClass::Multicast)),
            ("ff02::1", Some(AddressClass::Multicast)),
            ("255.255.255.255", Some(AddressClass::Reserved)),
            ("240.0.0.1", Some(AddressClass::Reserved)),
            // IPv4 inside IPv6.
            ("::ffff:127.0.0.1", Some(AddressClass::Loopback)),
            ("::ffff:169.254.169.254", Some(AddressClass::LinkLocal)),
            ("::10.0.0.1", Some(AddressClass::Private)),
            ("64:ff9b::a9fe:a9fe", Some(AddressClass::LinkLocal)),
            ("2002:a00:1::", Some(AddressClass::Private)),
            // The internet.
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("172.15.255.255", None),
            ("100.128.0.1", None),
            ("169.253.1.1", None),
            ("2606:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
        ] {
            assert_eq!(classify(ip(text)), class, "{text}");
        }
    }

    #[test]
    fn default_refuses_every_internal_class() {
        let policy = HostPolicy::default();
        for text in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "10.1.2.3",
            "fd00::1",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            assert!(policy.check(ip(text)).is_err(), "{text}");
        }
        assert_eq!(policy.check(ip("140.82.112.3")), Ok(()));
    }

    #[test]
    fn flag_values() {
        let parse = |s: &str| s.parse::<HostPolicy>().unwrap();
        assert_eq!(parse("none"), HostPolicy::none());
        assert_eq!(parse(""), HostPolicy::none());
        assert_eq!(parse("loopback"), HostPolicy::loopback());
        assert_eq!(parse("all"), HostPolicy::all());

        let loopback = parse("loopback");
        assert_eq!(loopback.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(loopback.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(
            loopback.check(ip("169.254.169.254")),
            Err(AddressClass::LinkLocal)
        );
        assert_eq!(loopback.check(ip("10.0.0.1")), Err(AddressClass::Private));

        let private = parse("private, link-local");
        assert_eq!(private.check(ip("10.0.0.1")), Ok(()));
        assert_eq!(private.check(ip("169.254.169.254")), Ok(()));
        assert_eq!(private.check(ip("127.0.0.1")), Err(AddressClass::Loopback));

        let cidr = parse("10.20.0.0/16,fd12::/16,192.168.1.7");
        assert_eq!(cidr.check(ip("10.20.3.4")), Ok(()));
        assert_eq!(cidr.check(ip("::ffff:10.20.3.4")), Ok(()));
        assert_eq!(cidr.check(ip("10.21.0.1")), Err(AddressClass::Private));
        assert_eq!(cidr.check(ip("fd12:1::1")), Ok(()));
        assert_eq!(cidr.check(ip("fd13::1")), Err(AddressClass::Private));
        assert_eq!(cidr.check(ip("192.168.1.7")), Ok(()));
        assert_eq!(cidr.check(ip("192.168.1.8")), Err(AddressClass::Private));
        assert_eq!(cidr.to_string(), "10.20.0.0/16,fd12::/16,192.168.1.7/32");

        let everything = parse("all");
        assert_eq!(everything.check(ip("169.254.169.254")), Ok(()));
        assert_eq!(everything.to_string(), "all");
        assert_eq!(parse("loopback,private").to_string(), "loopback,private");
        assert_eq!(HostPolicy::none().to_string(), "none");

        for bad in [
            "localhost",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/x",
            "yes",
        ] {
            assert!(bad.parse::<HostPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_judged_by_what_they_resolve_to() {
        // `localhost` resolves (from /etc/hosts) to loopback addresses only.
        let err = allowed_addresses("localhost", 80, &HostPolicy::none()).unwrap_err();
        match &err {
            GitError::HostNotAllowed(msg) => {
                assert!(msg.contains("localhost resolves to"), "{msg}");
                assert!(msg.contains("loopback"), "{msg}");
                assert!(msg.contains("--allow-internal-git-hosts loopback"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let addrs = allowed_addresses("localhost", 8080, &HostPolicy::loopback()).unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080)
        );

        // Literal addresses, with or without brackets.
        assert!(matches!(
            allowed_addresses("[::1]", 22, &HostPolicy::none()),
            Err(GitError::HostNotAllowed(_))
        ));
        match allowed_addresses("169.254.169.254", 80, &HostPolicy::loopback()) {
            Err(GitError::HostNotAllowed(msg)) => {
                assert!(msg.starts_with("169.254.169.254 is a link-local"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            allowed_addresses("8.8.8.8", 443, &HostPolicy::none()).unwrap(),
            vec![SocketAddr::new(ip("8.8.8.8"), 443)]
        );
    }
}

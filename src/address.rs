//! Client addresses, pure: the ranges a configuration names, and who the client is behind trusted proxies.
//!
//! Behind a load balancer the TCP peer is the balancer. Its `X-Forwarded-For` names the client, but any
//! client can send that header too, so it is believed only from the proxies the operator lists, and read
//! from the right: each trusted proxy appends the address it received from, so the right-most address that
//! is not a trusted proxy is the first hop nobody here vouches for (nginx's `real_ip_recursive`, Envoy's
//! `xff_num_trusted_hops`). An address to the left of it could have been written by the client itself.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The header load balancers (AWS ALB and ELB, Google Cloud, Azure, nginx, HAProxy, Envoy) append to.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// An address or a CIDR range, as a configuration writes it: `203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange(IpNet);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or a CIDR range (such as 203.0.113.7 or 10.0.0.0/8)")]
pub struct AddressRangeError(String);

impl AddressRange {
    pub fn contains(&self, address: IpAddr) -> bool {
        self.0.contains(&address)
    }
}

impl FromStr for AddressRange {
    type Err = AddressRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        // Host bits set (`10.1.2.3/8`) are dropped, as `ip route` does: the range is what the prefix says.
        let net = match text.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => text.parse::<IpAddr>().map(IpNet::from).map_err(|_| AddressRangeError(text.to_owned()))?,
        };
        Ok(Self(net))
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A single address is shown as written, without `/32`.
        if self.0.prefix_len() == self.0.max_prefix_len() {
            self.0.addr().fmt(f)
        } else {
            self.0.fmt(f)
        }
    }
}

impl Serialize for AddressRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddressRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Any of several ranges.
pub fn any_contains(ranges: &[AddressRange], address: IpAddr) -> bool {
    ranges.iter().any(|range| range.contains(address))
}

/// The proxies whose `X-Forwarded-For` is believed. Empty: the TCP peer is the client, and the header is
/// never read.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<AddressRange>);

impl TrustedProxies {
    pub fn new(ranges: Vec<AddressRange>) -> Self {
        Self(ranges)
    }

    /// The client's address: the peer itself unless it is a trusted proxy; then the right-most address of
    /// `X-Forwarded-For` (over all its lines, in order) that is not a trusted proxy. When every address is a
    /// trusted proxy, the left-most one. An entry that is not an address (`unknown`, an obfuscated name)
    /// ends the walk at the last address known: nothing beyond it can be told apart from a forgery.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !any_contains(&self.0, client) {
            return client;
        }
        for line in headers.get_all(FORWARDED_FOR).iter().rev() {
            let Ok(line) = line.to_str() else { return client };
            for entry in line.rsplit(',') {
                let Some(hop) = forwarded_address(entry) else { return client };
                client = hop;
                if !any_contains(&self.0, hop) {
                    return hop;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, with or without a port (Azure's Application Gateway adds one)
/// or the brackets of an IPv6 address with a port.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let address = (entry.parse::<IpAddr>().ok())
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|socket| socket.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(address.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[&str]) -> Vec<AddressRange> {
        list.iter().map(|r| r.parse().expect("range")).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn forwarded(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(FORWARDED_FOR, line.parse().expect("header value"));
        }
        headers
    }

    #[test]
    fn ranges_parse_addresses_and_cidrs_and_refuse_anything_else() {
        let parsed = ranges(&["203.0.113.7", "10.0.0.0/8", " 2001:db8::/32 ", "::1", "10.1.2.3/8"]);
        assert_eq!(
            parsed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["203.0.113.7", "10.0.0.0/8", "2001:db8::/32", "::1", "10.0.0.0/8"]
        );
        assert!(parsed[0].contains(ip("203.0.113.7")) && !parsed[0].contains(ip("203.0.113.8")));
        assert!(parsed[1].contains(ip("10.255.0.1")) && !parsed[1].contains(ip("11.0.0.1")));
        assert!(parsed[2].contains(ip("2001:db8:ffff::1")) && !parsed[2].contains(ip("2001:db9::1")));
        for bad in ["", "stripe.com", "10.0.0.0/33", "10.0.0", "1.2.3.4:80", "10.0.0.0/8/8"] {
            let error = bad.parse::<AddressRange>().expect_err(bad).to_string();
            assert!(error.contains("not an IP address or a CIDR range"), "{bad}: {error}");
        }
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() {
        let none = TrustedProxies::default();
        assert_eq!(none.client(ip("198.51.100.4"), &forwarded(&["203.0.113.7"])), ip("198.51.100.4"));
        let proxies = TrustedProxies::new(ranges(&["10.0.0.0/8"]));
        // A client reaching the gateway directly cannot choose its address by sending the header.
        assert_eq!(proxies.client(ip("198.51.100.4"), &forwarded(&["203.0.113.7"])), ip("198.51.100.4"));
    }

    #[test]
    fn behind_trusted_proxies_the_right_most_untrusted_address_is_the_client() {
        let proxies = TrustedProxies::new(ranges(&["10.0.0.0/8", "127.0.0.1"]));
        let peer = ip("10.0.0.2");
        assert_eq!(proxies.client(peer, &forwarded(&["203.0.113.7"])), ip("203.0.113.7"));
        // The client wrote the first address itself; the balancer appended the one it saw.
        assert_eq!(proxies.client(peer, &forwarded(&["192.0.2.1, 203.0.113.7"])), ip("203.0.113.7"));
        // Two proxy tiers: the inner one's address is skipped.
        assert_eq!(proxies.client(peer, &forwarded(&["192.0.2.1, 203.0.113.7, 10.9.9.9"])), ip("203.0.113.7"));
        // Several header lines are one list, in order.
        assert_eq!(proxies.client(peer, &forwarded(&["192.0.2.1", "203.0.113.7,10.9.9.9"])), ip("203.0.113.7"));
        // Ports and brackets, as some balancers write them.
        assert_eq!(proxies.client(peer, &forwarded(&["203.0.113.7:4711"])), ip("203.0.113.7"));
        assert_eq!(proxies.client(peer, &forwarded(&["[2001:db8::7]:4711"])), ip("2001:db8::7"));
        assert_eq!(proxies.client(peer, &forwarded(&["[2001:db8::7]"])), ip("2001:db8::7"));
        assert_eq!(proxies.client(peer, &forwarded(&["2001:db8::7"])), ip("2001:db8::7"));
        // No header: the proxy itself (a health check).
        assert_eq!(proxies.client(peer, &HeaderMap::new()), peer);
        // Every hop trusted: the left-most.
        assert_eq!(proxies.client(peer, &forwarded(&["10.1.1.1, 127.0.0.1"])), ip("10.1.1.1"));
        // An entry that is not an address ends the walk at the last address known.
        assert_eq!(proxies.client(peer, &forwarded(&["203.0.113.7, unknown"])), peer);
        assert_eq!(proxies.client(peer, &forwarded(&["unknown, 10.3.3.3"])), ip("10.3.3.3"));
        assert_eq!(proxies.client(peer, &forwarded(&[""])), peer);
    }

    #[test]
    fn ipv4_mapped_addresses_are_read_as_ipv4() {
        // A dual-stack listener ([::]) sees IPv4 peers as ::ffff:a.b.c.d.
        let proxies = TrustedProxies::new(ranges(&["10.0.0.0/8"]));
        assert_eq!(proxies.client(ip("::ffff:10.0.0.2"), &forwarded(&["::ffff:203.0.113.7"])), ip("203.0.113.7"));
        assert_eq!(proxies.client(ip("::ffff:198.51.100.4"), &HeaderMap::new()), ip("198.51.100.4"));
    }
}

//! The client's address as the logs should show it: the TCP peer, or, when that peer is a
//! trusted reverse proxy, the address the proxy put last in `X-Forwarded-For`.
//!
//! Only the last hop is believed: a client can send its own `X-Forwarded-For` with anything in
//! it, and a proxy (nginx's `$proxy_add_x_forwarded_for`) appends the address it really saw, so
//! the last entry is the only one a trusted proxy vouches for.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;

use crate::server::AppState;

/// One trusted network: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    fn parse(text: &str) -> Option<Network> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr.parse::<IpAddr>().ok()?, Some(prefix.parse::<u8>().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Network { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        if self.prefix == 0 {
            return true;
        }
        // IPv4 addresses sit in the top 32 bits, so a prefix counts from the top for both.
        let mask = u128::MAX << (128 - u32::from(self.prefix));
        bits(self.addr) & mask == bits(ip) & mask
    }
}

/// An IPv4 peer seen through an IPv6 socket (`::ffff:10.0.0.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The proxies allowed to say who the client is (`PRIVORA_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Network>);

impl TrustedProxies {
    /// Parses a comma-separated list of IPs and CIDRs; the error is the entry that is not one.
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| Network::parse(entry).ok_or_else(|| entry.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(peer))
    }

    /// The client's address for a request from `peer` with these headers.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let last_hop = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .next_back();
        let real_ip = || headers.get("x-real-ip")?.to_str().ok()?.trim().parse::<IpAddr>().ok();
        last_hop.or_else(real_ip).map(canonical).unwrap_or(peer)
    }
}

/// Extractor: the client's address for logs (see the module comment).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<Arc<AppState>> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        Ok(ClientAddr(state.config.trusted_proxies.client_ip(peer, &parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_addresses_and_networks() {
        let proxies = TrustedProxies::parse("127.0.0.1, 10.0.0.0/8,fd00::/8").unwrap();
        assert!(proxies.trusts(ip("127.0.0.1")));
        assert!(!proxies.trusts(ip("127.0.0.2")));
        assert!(proxies.trusts(ip("10.200.3.4")));
        assert!(proxies.trusts(ip("::ffff:10.1.2.3")));
        assert!(!proxies.trusts(ip("11.0.0.1")));
        assert!(proxies.trusts(ip("fd12::1")));
        assert!(!proxies.trusts(ip("fe80::1")));
        assert!(TrustedProxies::parse("0.0.0.0/0").unwrap().trusts(ip("8.8.8.8")));
        assert_eq!(TrustedProxies::parse("").unwrap(), TrustedProxies::default());
        assert_eq!(TrustedProxies::parse("10.0.0.0/33"), Err("10.0.0.0/33".into()));
        assert_eq!(TrustedProxies::parse("proxy.local"), Err("proxy.local".into()));
    }

    #[test]
    fn believes_the_last_hop_of_a_trusted_proxy_only() {
        let proxies = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let forwarded = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7")]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &forwarded), ip("203.0.113.7"));
        assert_eq!(proxies.client_ip(ip("198.51.100.1"), &forwarded), ip("198.51.100.1"), "untrusted peer");
        let two_headers = headers(&[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "203.0.113.8")]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &two_headers), ip("203.0.113.8"));
        let real_ip = headers(&[("x-real-ip", "203.0.113.9")]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &real_ip), ip("203.0.113.9"));
        let garbage = headers(&[("x-forwarded-for", "not an address")]);
        assert_eq!(proxies.client_ip(ip("10.0.0.5"), &garbage), ip("10.0.0.5"));
    }
}

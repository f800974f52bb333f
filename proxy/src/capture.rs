//! `weft-proxy init`: the redirect rules that put the sidecar under an app
//! that was not changed, in the current network namespace (iptables, nat
//! table; Debian's `iptables` package, nftables underneath).
//!
//! Two chains of weft's own, each reached by one jump rule:
//!
//! - `WEFT_OUTPUT` (from `OUTPUT`): TCP the app opens goes to the sidecar's
//!   outbound port, and with `--dns-port` its DNS queries (UDP port 53) to
//!   the sidecar's DNS listener. The sidecar's own traffic (by its UID) returns first, so
//!   its upstream connections are never captured and nothing loops; so do
//!   loopback destinations (the app's own local services, and the explicit
//!   outbound listener), the skipped CIDRs and the skipped ports.
//! - `WEFT_INBOUND` (from `PREROUTING`): TCP arriving for the app's ports
//!   (all, or `--inbound-ports`) goes to the sidecar's inbound port; the
//!   sidecar's own ports and the skipped ones return first.
//!
//! Installing flushes and refills weft's chains and adds each jump only if
//! it is missing, so running it twice changes nothing; `--uninstall`
//! removes the jumps and the chains, and nothing else.

use std::net::Ipv4Addr;
use std::process::Command;

/// The chain the app's outbound TCP goes through.
pub const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";
/// The chain TCP for the app's ports goes through.
pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";

/// What `weft-proxy init` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The sidecar runs as this user; its traffic is not captured.
    pub proxy_uid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The app's ports whose inbound TCP is captured; empty: all.
    pub inbound_ports: Vec<u16>,
    /// Inbound ports never captured (besides the sidecar's own).
    pub skip_inbound_ports: Vec<u16>,
    /// Destination ports the app reaches directly.
    pub skip_outbound_ports: Vec<u16>,
    /// Destination networks the app reaches directly (IPv4 CIDRs).
    pub skip_cidrs: Vec<String>,
    /// The app's DNS queries (UDP port 53, whatever the resolver) go to this
    /// port of the sidecar, which answers mesh names.
    pub dns_port: Option<u16>,
}

/// Parses `10.0.0.0/8`-style IPv4 networks, naming the flag on error.
pub fn parse_cidr(s: &str) -> Result<String, String> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("'{s}' is not an IPv4 address or CIDR"))?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("'{s}': prefix length must be 0-32"))?;
    Ok(format!("{addr}/{len}"))
}

impl Capture {
    /// The rules of weft's two chains, as iptables arguments after
    /// `-t nat -A <chain>`.
    pub fn rules(&self) -> Vec<(&'static str, Vec<String>)> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut out = Vec::new();
        // Outbound: the sidecar's own traffic, loopback, skips; then redirect.
        out.push((OUTPUT_CHAIN, s(&["-m", "owner", "--uid-owner", &self.proxy_uid.to_string(), "-j", "RETURN"])));
        // DNS before the loopback exception: the app's resolver may well be
        // on loopback.
        if let Some(port) = self.dns_port {
            out.push((
                OUTPUT_CHAIN,
                s(&["-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", &port.to_string()]),
            ));
        }
        out.push((OUTPUT_CHAIN, s(&["-d", "127.0.0.0/8", "-j", "RETURN"])));
        for cidr in &self.skip_cidrs {
            out.push((OUTPUT_CHAIN, s(&["-d", cidr, "-j", "RETURN"])));
        }
        for p in &self.skip_outbound_ports {
            out.push((OUTPUT_CHAIN, s(&["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"])));
        }
        let to = |port: u16| s(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &port.to_string()]);
        out.push((OUTPUT_CHAIN, to(self.outbound_port)));
        // Inbound: the sidecar's own ports and the skipped ones; then the
        // app's ports (or all) to the inbound listener.
        let mut own = vec![self.inbound_port, self.outbound_port];
        own.extend(&self.skip_inbound_ports);
        own.dedup();
        for p in own {
            out.push((INBOUND_CHAIN, s(&["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"])));
        }
        if self.inbound_ports.is_empty() {
            out.push((INBOUND_CHAIN, to(self.inbound_port)));
        } else {
            for p in &self.inbound_ports {
                let mut r = s(&["-p", "tcp", "--dport", &p.to_string()]);
                r.extend(s(&["-j", "REDIRECT", "--to-ports", &self.inbound_port.to_string()]));
                out.push((INBOUND_CHAIN, r));
            }
        }
        out
    }

    /// Installs the rules (again: the chains are refilled, the jumps added
    /// only when missing).
    pub fn install(&self) -> Result<(), String> {
        for (chain, _) in JUMPS {
            if !iptables(&["-t", "nat", "-n", "-L", chain]).is_ok_and(|o| o.status.success()) {
                run(&["-t", "nat", "-N", chain])?;
            }
            run(&["-t", "nat", "-F", chain])?;
        }
        for (chain, rule) in self.rules() {
            let mut args = vec!["-t", "nat", "-A", chain];
            args.extend(rule.iter().map(String::as_str));
            run(&args)?;
        }
        for (chain, from) in JUMPS {
            // Every protocol: the chains pick TCP (and the DNS queries).
            if !iptables(&["-t", "nat", "-C", from, "-j", chain]).is_ok_and(|o| o.status.success()) {
                run(&["-t", "nat", "-A", from, "-j", chain])?;
            }
        }
        Ok(())
    }

    /// Removes the jumps and weft's chains; nothing else.
    pub fn uninstall() -> Result<(), String> {
        for (chain, from) in JUMPS {
            // The jump, and the TCP-only jump of earlier versions.
            for form in [&["-j", chain][..], &["-p", "tcp", "-j", chain]] {
                let check = [&["-t", "nat", "-C", from][..], form].concat();
                while iptables(&check).is_ok_and(|o| o.status.success()) {
                    run(&[&["-t", "nat", "-D", from][..], form].concat())?;
                }
            }
            if iptables(&["-t", "nat", "-n", "-L", chain]).is_ok_and(|o| o.status.success()) {
                run(&["-t", "nat", "-F", chain])?;
                run(&["-t", "nat", "-X", chain])?;
            }
        }
        Ok(())
    }
}

/// weft's chains and the built-in chain that jumps to each.
const JUMPS: [(&str, &str); 2] = [(OUTPUT_CHAIN, "OUTPUT"), (INBOUND_CHAIN, "PREROUTING")];

fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").args(args).output()
}

/// Runs iptables, failing with its own message.
fn run(args: &[&str]) -> Result<(), String> {
    let out = iptables(args).map_err(|e| format!("cannot run iptables (Debian package `iptables`): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_skip_the_sidecar_loopback_and_what_was_asked_then_redirect() {
        let c = Capture {
            proxy_uid: 2102,
            outbound_port: 4140,
            inbound_port: 4143,
            inbound_ports: vec![8080],
            skip_inbound_ports: vec![4191],
            skip_outbound_ports: vec![5432],
            skip_cidrs: vec!["10.96.0.0/12".into()],
            dns_port: Some(4153),
        };
        let text: Vec<String> = c.rules().iter().map(|(ch, r)| format!("{ch} {}", r.join(" "))).collect();
        assert_eq!(
            text,
            [
                "WEFT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "WEFT_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 4153",
                "WEFT_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "WEFT_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
                "WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
                "WEFT_INBOUND -p tcp --dport 4143 -j RETURN",
                "WEFT_INBOUND -p tcp --dport 4140 -j RETURN",
                "WEFT_INBOUND -p tcp --dport 4191 -j RETURN",
                "WEFT_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 4143",
            ]
        );
        let all = Capture { inbound_ports: vec![], ..c };
        assert_eq!(all.rules().last().unwrap().1.join(" "), "-p tcp -j REDIRECT --to-ports 4143");
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.168.1.7").unwrap(), "192.168.1.7/32");
        assert!(parse_cidr("10.0.0.0/33").unwrap_err().contains("0-32"));
        assert!(parse_cidr("example.com/8").unwrap_err().contains("not an IPv4"));
    }
}

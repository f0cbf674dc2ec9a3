//! Peers from DNS (`--peers-dns`), for Fly.io: the TXT record of `vms.<app>.internal` lists the
//! app's machines as `ID REGION` pairs separated by commas, and each machine answers at
//! `<ID>.vm.<app>.internal`. One TXT question over UDP to the system's resolver (on Fly, fdaa::3)
//! is all this needs, so it is written here rather than pulling in a resolver crate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{valid_node_id, PeerConfig};

const TYPE_TXT: u16 = 16;
const CLASS_IN: u16 = 1;

/// The peers named by the TXT record `name`, reached on `port`. This node (`me`) is left out.
pub async fn peers(name: &str, port: u16, me: &str) -> anyhow::Result<Vec<PeerConfig>> {
    let server = resolver()?;
    let txt = query_txt(server, name).await.with_context(|| format!("asking {server} for the TXT record of {name}"))?;
    let app = name.strip_prefix("vms.").and_then(|rest| rest.strip_suffix(".internal")).unwrap_or(name);
    Ok(parse_machines(&txt.concat())
        .into_iter()
        .filter(|(id, _)| id != me)
        .map(|(id, region)| PeerConfig { addr: format!("{id}.vm.{app}.internal:{port}"), id, region })
        .collect())
}

/// `ID REGION` pairs from a Fly `vms.<app>.internal` TXT string.
pub fn parse_machines(txt: &str) -> Vec<(String, String)> {
    txt.split(',')
        .filter_map(|entry| {
            let mut words = entry.split_whitespace();
            let (id, region) = (words.next()?, words.next()?);
            valid_node_id(id).then(|| (id.to_string(), region.to_string()))
        })
        .collect()
}

/// The resolver: `KEFU_DNS_SERVER` (host:port) or the first nameserver of /etc/resolv.conf.
fn resolver() -> anyhow::Result<SocketAddr> {
    if let Ok(server) = std::env::var("KEFU_DNS_SERVER") {
        return server.parse().with_context(|| format!("KEFU_DNS_SERVER={server:?} is not host:port"));
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").context("reading /etc/resolv.conf")?;
    let ip = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .context("no nameserver in /etc/resolv.conf")?;
    Ok(SocketAddr::new(ip, 53))
}

/// Asks `server` for the TXT strings of `name` (three tries, one second each).
pub async fn query_txt(server: SocketAddr, name: &str) -> anyhow::Result<Vec<String>> {
    let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    let id: u16 = rand::random();
    let query = build_query(id, name)?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        socket.send(&query).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await {
            return parse_txt_answer(&buf[..n], id);
        }
    }
    bail!("no answer")
}

/// A recursive query for the TXT records of `name`.
pub fn build_query(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // recursion desired
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len()).ok().filter(|l| (1..=63).contains(l)).with_context(|| format!("bad DNS label {label:?}"))?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&TYPE_TXT.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(q)
}

/// The TXT strings of an answer to query `id`, one per record (a record's character strings are
/// joined).
pub fn parse_txt_answer(msg: &[u8], id: u16) -> anyhow::Result<Vec<String>> {
    let u16_at = |at: usize| -> anyhow::Result<u16> {
        let b = msg.get(at..at + 2).context("truncated DNS answer")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    if u16_at(0)? != id {
        bail!("DNS answer for another query");
    }
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        bail!("not a DNS answer");
    }
    if flags & 0x000f != 0 {
        bail!("DNS error code {}", flags & 0x000f);
    }
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at)?;
        let (rtype, len) = (u16_at(at)?, usize::from(u16_at(at + 8)?));
        let data = msg.get(at + 10..at + 10 + len).context("truncated DNS record")?;
        at += 10 + len;
        if rtype != TYPE_TXT {
            continue;
        }
        let mut text = String::new();
        let mut i = 0;
        while i < data.len() {
            let n = usize::from(data[i]);
            let part = data.get(i + 1..i + 1 + n).context("truncated TXT string")?;
            text.push_str(&String::from_utf8_lossy(part));
            i += 1 + n;
        }
        out.push(text);
    }
    Ok(out)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> anyhow::Result<usize> {
    loop {
        let len = *msg.get(at).context("truncated DNS name")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    /// An answer to `query` carrying `strings` as one TXT record (a compressed owner name).
    fn answer(query: &[u8], strings: &[&str]) -> Vec<u8> {
        let mut a = query.to_vec();
        a[2] = 0x81;
        a[3] = 0x80;
        a[6..8].copy_from_slice(&1u16.to_be_bytes());
        let rdata: Vec<u8> = strings.iter().flat_map(|s| std::iter::once(s.len() as u8).chain(s.bytes())).collect();
        a.extend_from_slice(&[0xc0, 12]);
        a.extend_from_slice(&TYPE_TXT.to_be_bytes());
        a.extend_from_slice(&CLASS_IN.to_be_bytes());
        a.extend_from_slice(&60u32.to_be_bytes());
        a.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        a.extend_from_slice(&rdata);
        a
    }

    #[test]
    fn fly_machine_lists_parse() {
        assert_eq!(
            parse_machines("148ed193b95089 iad,e784079b449d89 fra, 3d8dd5d6f39448 sin"),
            vec![("148ed193b95089".into(), "iad".into()), ("e784079b449d89".into(), "fra".into()), ("3d8dd5d6f39448".into(), "sin".into())]
        );
        assert!(parse_machines("").is_empty());
        assert_eq!(parse_machines("bad_id iad,ok fra").len(), 1);
    }

    #[test]
    fn txt_answers_parse_and_mismatches_are_refused() {
        let q = build_query(7, "vms.kefu.internal").unwrap();
        let a = answer(&q, &["148ed193b95089 iad,", "e784079b449d89 fra"]);
        assert_eq!(parse_txt_answer(&a, 7).unwrap(), vec!["148ed193b95089 iad,e784079b449d89 fra".to_string()]);
        assert!(parse_txt_answer(&a, 8).is_err(), "another query's id");
        assert!(parse_txt_answer(&q, 7).is_err(), "a query is not an answer");
        assert!(parse_txt_answer(&a[..a.len() - 3], 7).is_err(), "truncated");
        assert!(build_query(1, "a..b").is_err());
    }

    #[tokio::test]
    async fn peers_come_from_a_real_udp_resolver() {
        // A one-shot DNS server on loopback answering with a Fly-style machine list.
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let reply = answer(&buf[..n], &["me1 iad,peer2 fra,peer3 sin"]);
            server.send_to(&reply, from).await.unwrap();
        });
        let txt = query_txt(addr, "vms.kefu.internal").await.unwrap();
        let machines = parse_machines(&txt.concat());
        assert_eq!(machines.len(), 3);
        assert_eq!(machines[1], ("peer2".to_string(), "fra".to_string()));
    }
}

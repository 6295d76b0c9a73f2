//! A tiny authoritative DNS server for tests: A records for the names it is given, no
//! records of other types for those names, NXDOMAIN for every other name.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// The reply to query `q`, or `None` when `q` is not a query this server can parse.
fn reply(q: &[u8], names: &[(String, [u8; 4])]) -> Option<Vec<u8>> {
    let mut i = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let n = *q.get(i)? as usize;
        i += 1;
        if n == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + n)?).to_ascii_lowercase());
        i += n;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let end = i + 4;
    q.get(..end)?;
    let name = labels.join(".");
    let known = names.iter().find(|(n, _)| n.eq_ignore_ascii_case(&name));
    let answer = known.filter(|_| qtype == 1).map(|(_, ip)| *ip);
    let mut r = q[..2].to_vec(); // id
    r.push(0x84 | (q[2] & 0x01)); // response, authoritative, recursion desired as asked
    r.push(if known.is_some() { 0x80 } else { 0x83 }); // recursion available; NOERROR or NXDOMAIN
    r.extend_from_slice(&[0, 1, 0, answer.is_some() as u8, 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..end]);
    if let Some(ip) = answer {
        // Name by pointer to the question, A, IN, TTL 300, 4 bytes of address.
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
        r.extend_from_slice(&ip);
    }
    Some(r)
}

/// Serve `names` (name, IPv4 address) on UDP `addr` until the runtime ends.
pub async fn serve_dns(addr: &str, names: &[(&str, [u8; 4])]) -> std::io::Result<SocketAddr> {
    let sock = UdpSocket::bind(addr).await?;
    let local = sock.local_addr()?;
    let names: Vec<(String, [u8; 4])> = names.iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if let Some(r) = reply(&buf[..n], &names) {
                let _ = sock.send_to(&r, from).await;
            }
        }
    });
    Ok(local)
}

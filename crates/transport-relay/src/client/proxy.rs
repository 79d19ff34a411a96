//! HTTP CONNECT tunnelling through a forward proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest proxy response head read: proxies answer CONNECT with a few hundred bytes.
const MAX_PROXY_HEAD_BYTES: usize = 8 * 1024;

/// The proxy for `target` (a `ws://` or `wss://` URL) from environment variables read by
/// `env`: `HTTPS_PROXY` for `wss`, `HTTP_PROXY` for `ws` (lowercase names win, as curl does),
/// unless `NO_PROXY` matches the host or the host is loopback. Pure, so it is tested without touching the environment.
pub(crate) fn proxy_from_env(
    target: &url::Url,
    env: impl Fn(&str) -> Option<String>,
) -> Option<url::Url> {
    let get = |name: &str| {
        env(&name.to_ascii_lowercase())
            .or_else(|| env(name))
            .filter(|v| !v.trim().is_empty())
    };
    let host = target
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    // Loopback never goes through a proxy (a proxy could not reach our loopback anyway).
    if host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        return None;
    }
    if let Some(no) = get("NO_PROXY") {
        for entry in no.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                return None;
            }
            let entry = entry.split(':').next().unwrap_or(entry);
            let bare = entry.trim_start_matches('.');
            if host.eq_ignore_ascii_case(bare)
                || (host.len() > bare.len()
                    && host
                        .to_ascii_lowercase()
                        .ends_with(&bare.to_ascii_lowercase())
                    && host.as_bytes()[host.len() - bare.len() - 1] == b'.')
            {
                return None;
            }
        }
    }
    let var = if target.scheme() == "wss" {
        "HTTPS_PROXY"
    } else {
        "HTTP_PROXY"
    };
    let value = get(var).or_else(|| get("ALL_PROXY"))?;
    let with_scheme = if value.contains("://") {
        value
    } else {
        format!("http://{value}")
    };
    url::Url::parse(&with_scheme)
        .ok()
        .filter(|u| u.scheme() == "http" && u.host_str().is_some())
}

/// Opens a TCP tunnel to `host:port` through the HTTP proxy `proxy` (basic auth from its user
/// info). Returns the stream positioned after the proxy's `200` response.
pub(crate) async fn connect_via(
    proxy: &url::Url,
    host: &str,
    port: u16,
) -> Result<TcpStream, String> {
    let proxy_host = proxy.host_str().ok_or("proxy URL has no host")?;
    let proxy_port = proxy.port_or_known_default().unwrap_or(80);
    let mut stream = TcpStream::connect((
        proxy_host.trim_start_matches('[').trim_end_matches(']'),
        proxy_port,
    ))
    .await
    .map_err(|e| format!("cannot reach proxy {proxy_host}:{proxy_port}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if !proxy.username().is_empty() {
        let user = decode(proxy.username());
        let pass = decode(proxy.password().unwrap_or(""));
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64(format!("{user}:{pass}").as_bytes())
        ));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("proxy write failed: {e}"))?;
    // Read byte by byte so that nothing after the head (the tunnel) is consumed.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD_BYTES {
            return Err(format!(
                "proxy response head exceeds {MAX_PROXY_HEAD_BYTES} bytes"
            ));
        }
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| format!("proxy read failed: {e}"))?;
        if n == 0 {
            return Err("proxy closed the connection during CONNECT".into());
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") || code != "200" {
        return Err(format!(
            "proxy refused CONNECT {authority}: {}",
            status_line.chars().take(120).collect::<String>()
        ));
    }
    Ok(stream)
}

fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pick(target: &str, vars: &[(&str, &str)]) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        proxy_from_env(&url::Url::parse(target).unwrap(), |k| map.get(k).cloned())
            .map(|u| u.to_string())
    }

    #[test]
    fn env_selection_follows_curl_conventions() {
        let vars = [
            ("HTTPS_PROXY", "http://secure:3128"),
            ("HTTP_PROXY", "plain:8080"),
            ("NO_PROXY", "internal.example, .corp.example,10.0.0.1:443"),
        ];
        assert_eq!(
            pick("wss://relay.example.com/r", &vars).as_deref(),
            Some("http://secure:3128/")
        );
        assert_eq!(
            pick("ws://relay.example.com/r", &vars).as_deref(),
            Some("http://plain:8080/")
        );
        assert_eq!(pick("wss://internal.example/r", &vars), None);
        assert_eq!(pick("wss://a.internal.example/r", &vars), None);
        assert_eq!(pick("wss://relay.corp.example/r", &vars), None);
        assert_eq!(
            pick("wss://notinternal.example/r", &vars).as_deref(),
            Some("http://secure:3128/")
        );
        assert_eq!(pick("wss://10.0.0.1/r", &vars), None);
        assert_eq!(
            pick(
                "wss://x/r",
                &[
                    ("https_proxy", "http://lower:1"),
                    ("HTTPS_PROXY", "http://upper:2")
                ]
            )
            .as_deref(),
            Some("http://lower:1/")
        );
        assert_eq!(
            pick(
                "wss://x/r",
                &[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]
            ),
            None
        );
        assert_eq!(
            pick("wss://x/r", &[("ALL_PROXY", "http://all:1")]).as_deref(),
            Some("http://all:1/")
        );
        assert_eq!(pick("wss://x/r", &[("HTTPS_PROXY", "socks5://s:1")]), None);
        assert_eq!(pick("wss://x/r", &[]), None);
        for local in ["ws://127.0.0.1:1/r", "ws://[::1]:1/r", "wss://localhost/r"] {
            assert_eq!(
                pick(local, &[("ALL_PROXY", "http://all:1")]),
                None,
                "{local}"
            );
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(decode("us%40er"), "us@er");
        assert_eq!(decode("a+b"), "a+b");
    }
}

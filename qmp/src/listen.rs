//! Parsing of `-qmp` socket specifications.
//!
//! This module owns the qemu-style spelling of a QMP listening socket:
//!
//! * `unix:PATH,server=on,wait=off` (or `unix:PATH,server,nowait`)
//! * `tcp:HOST:PORT,server=on,wait=off` (HOST may be empty for "any",
//!   or a bracketed IPv6 address such as `[::1]`)
//! * `stdio`: the process's standard input and output (no options)
//!
//! Commas inside PATH are written `,,` as in QEMU. Minivmm only listens, and
//! never blocks start-up waiting for a client, so `server=off` (connecting
//! out), `wait=on` and any other option are refused by name. `server` is
//! required; `wait` defaults to off.

use std::fmt;
use std::path::PathBuf;

/// Why a `-qmp` specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenSpecError {
    /// Neither `unix:`, `tcp:` nor `stdio`.
    #[error("'{0}': unsupported monitor backend, expected unix:PATH,server=on,wait=off, tcp:HOST:PORT,server=on,wait=off or stdio")]
    Backend(String),
    /// `unix:` with an empty path.
    #[error("'{0}': empty socket path")]
    EmptyPath(String),
    /// `tcp:` address without a valid port.
    #[error("'{spec}': bad tcp address '{addr}', expected HOST:PORT")]
    TcpAddress {
        /// The whole specification.
        spec: String,
        /// The address part.
        addr: String,
    },
    /// An option minivmm does not implement.
    #[error("'{spec}': unsupported option '{option}'")]
    UnsupportedOption {
        /// The whole specification.
        spec: String,
        /// The option as written.
        option: String,
    },
    /// `server` missing or off: minivmm does not connect out to a QMP client.
    #[error("'{0}': minivmm only listens for QMP clients, add server=on")]
    NotServer(String),
    /// `wait=on` (or no `nowait` on a server that would wait): not supported.
    #[error("'{0}': wait=on is not supported, use wait=off")]
    Wait(String),
    /// An option value that is not a boolean.
    #[error("'{spec}': option '{option}' expects on or off")]
    BadBool {
        /// The whole specification.
        spec: String,
        /// The option as written.
        option: String,
    },
}

/// Where a QMP listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP socket; `host` is empty for "any address".
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port (0 = pick one).
        port: u16,
    },
    /// Standard input and output: one connection, there from the start.
    Stdio,
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenSpec::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            ListenSpec::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            ListenSpec::Stdio => write!(f, "stdio"),
        }
    }
}

/// Splits on single commas; `,,` stands for a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = parts.last_mut() {
                    last.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn parse_bool(spec: &str, option: &str, value: &str) -> Result<bool, ListenSpecError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(ListenSpecError::BadBool {
            spec: spec.into(),
            option: option.into(),
        }),
    }
}

impl ListenSpec {
    /// Parses a `-qmp` argument.
    pub fn parse(spec: &str) -> Result<ListenSpec, ListenSpecError> {
        if spec == "stdio" {
            return Ok(ListenSpec::Stdio);
        }
        let mut parts = split_options(spec).into_iter();
        let target = parts.next().unwrap_or_default();
        let mut server = false;
        let mut wait = false;
        for opt in parts {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            match (key, value) {
                ("server", None) => server = true,
                ("server", Some(v)) => server = parse_bool(spec, &opt, v)?,
                ("nowait", None) => wait = false,
                ("wait", None) => wait = true,
                ("wait", Some(v)) => wait = parse_bool(spec, &opt, v)?,
                _ => {
                    return Err(ListenSpecError::UnsupportedOption {
                        spec: spec.into(),
                        option: opt.clone(),
                    })
                }
            }
        }
        let parsed = if let Some(path) = target.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenSpecError::EmptyPath(spec.into()));
            }
            ListenSpec::Unix(PathBuf::from(path))
        } else if let Some(addr) = target.strip_prefix("tcp:") {
            let bad = || ListenSpecError::TcpAddress {
                spec: spec.into(),
                addr: addr.into(),
            };
            let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            let host = match host.strip_prefix('[') {
                Some(h) => h.strip_suffix(']').ok_or_else(bad)?,
                None if host.contains(':') => return Err(bad()),
                None => host,
            };
            ListenSpec::Tcp {
                host: host.into(),
                port,
            }
        } else {
            return Err(ListenSpecError::Backend(spec.into()));
        };
        if !server {
            return Err(ListenSpecError::NotServer(spec.into()));
        }
        if wait {
            return Err(ListenSpecError::Wait(spec.into()));
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_specs() {
        let u = ListenSpec::Unix("/tmp/q.sock".into());
        assert_eq!(
            ListenSpec::parse("unix:/tmp/q.sock,server=on,wait=off"),
            Ok(u.clone())
        );
        assert_eq!(
            ListenSpec::parse("unix:/tmp/q.sock,server,nowait"),
            Ok(u.clone())
        );
        assert_eq!(ListenSpec::parse("unix:/tmp/q.sock,server"), Ok(u));
        assert_eq!(
            ListenSpec::parse("unix:/tmp/a,,b,server=on,wait=off"),
            Ok(ListenSpec::Unix("/tmp/a,b".into()))
        );
        assert_eq!(
            ListenSpec::parse("tcp:127.0.0.1:4444,server=on,wait=off"),
            Ok(ListenSpec::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            })
        );
        assert_eq!(
            ListenSpec::parse("tcp::4444,server,nowait"),
            Ok(ListenSpec::Tcp {
                host: "".into(),
                port: 4444
            })
        );
        let v6 = ListenSpec::parse("tcp:[::1]:0,server=on,wait=off").unwrap();
        assert_eq!(
            v6,
            ListenSpec::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        assert_eq!(v6.to_string(), "tcp:[::1]:0");
    }

    #[test]
    fn bad_specs() {
        let e = |s: &str| ListenSpec::parse(s).unwrap_err().to_string();
        assert!(e("unix:/q,server=on,wait=on").contains("wait=on is not supported"));
        assert!(e("unix:/q,server=on,wait").contains("wait=on"));
        assert!(e("unix:/q,server=on,telnet=on").contains("unsupported option 'telnet=on'"));
        assert!(e("unix:/q,server=on,bogus").contains("'bogus'"));
        assert!(e("unix:/q").contains("server=on"));
        assert!(e("unix:/q,server=off").contains("server=on"));
        assert!(e("unix:/q,server=maybe").contains("'server=maybe'"));
        assert!(e("unix:,server").contains("empty socket path"));
        assert_eq!(ListenSpec::parse("stdio"), Ok(ListenSpec::Stdio));
        assert!(e("stdio,server=on").contains("unsupported monitor backend"));
        assert!(e("vc").contains("unsupported monitor backend"));
        assert!(e("tcp:localhost,server").contains("bad tcp address"));
        assert!(e("tcp:localhost:http,server").contains("bad tcp address"));
        assert!(e("tcp:::1:44,server").contains("bad tcp address"));
    }
}

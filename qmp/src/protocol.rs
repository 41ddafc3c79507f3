//! QMP wire format: what one message looks like on the socket.
//!
//! This module owns the JSON shapes of the protocol (QEMU's
//! `docs/interop/qmp-spec.rst`) and nothing about sockets or commands:
//!
//! 1. server → client, on connect: the greeting
//!    `{"QMP": {"version": {...}, "capabilities": []}}` ([`greeting`]);
//! 2. client → server: requests `{"execute": NAME, "arguments"?: {...}, "id"?: ANY}`,
//!    checked by [`parse_request`] (the arguments themselves are checked by
//!    [`crate::schema`]);
//! 3. server → client: exactly one reply per request, either
//!    `{"return": VALUE, "id"?: ANY}` ([`encode_return`]) or
//!    `{"error": {"class": CLASS, "desc": TEXT}, "id"?: ANY}` ([`encode_error`]);
//! 4. server → client, at any time after negotiation: events
//!    `{"event": NAME, "data"?: {...}, "timestamp": {"seconds", "microseconds"}}`
//!    ([`Event`]).
//!
//! Every server message is one JSON object followed by `"\r\n"`, written as
//! pure ASCII (non-ASCII characters in strings are `\uXXXX` escaped) and
//! spaced as QEMU writes it (`{"return": {"status": "running", "id": 1}}`:
//! `": "` after a key, `", "` between members), which scripts grep for. Minivmm offers no out-of-band capability, so the greeting lists none
//! and `exec-oob` is refused.

use std::fmt;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// QMP error classes (QEMU's `QapiErrorClass`), serialized with QEMU's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Any error without a more specific class (almost all of them).
    GenericError,
    /// Unknown command, or a command not allowed in the current mode.
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// A named device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The wire spelling, e.g. `"GenericError"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": class, "desc": desc}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// Human-readable description (QEMU's wording where QEMU has one).
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of nearly every failure.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }
}

/// The version reported in the greeting and by `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Free-form package string, e.g. `"minivmm 0.1.0"`.
    pub package: String,
}

impl Default for VersionInfo {
    /// This crate's own version, with package `"minivmm X.Y.Z"`.
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        let mut parts = version
            .split(['.', '-', '+'])
            .map(|p| p.parse::<u64>().unwrap_or(0));
        VersionInfo {
            major: parts.next().unwrap_or(0),
            minor: parts.next().unwrap_or(0),
            micro: parts.next().unwrap_or(0),
            package: format!("minivmm {version}"),
        }
    }
}

impl VersionInfo {
    /// The `VersionInfo` JSON object: `{"qemu": {"micro","minor","major"}, "package"}`.
    /// This is also the `query-version` return value.
    pub fn to_json(&self) -> Value {
        json!({
            "qemu": {"micro": self.micro, "minor": self.minor, "major": self.major},
            "package": self.package,
        })
    }
}

/// The greeting sent to every client on connect. Minivmm offers no capabilities.
pub fn greeting(version: &VersionInfo) -> Value {
    json!({"QMP": {"version": version.to_json(), "capabilities": []}})
}

/// A syntactically valid request: the command name, its (unchecked) arguments
/// and the client's `id`, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Value of `execute`.
    pub name: String,
    /// Value of `arguments`, or an empty object when absent.
    pub arguments: Map<String, Value>,
    /// Value of `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// A request that could not be accepted, with the `id` to echo if one could be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    /// The error to send back.
    pub error: QmpError,
    /// The request's `id`, when the input was an object that had one.
    pub id: Option<Value>,
}

/// Parses one complete JSON text (one value, as cut by [`crate::framing`])
/// into a [`Request`], with QEMU's error wording for every malformed case.
pub fn parse_request(input: &[u8]) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_slice(input).map_err(|e| RequestError {
        error: QmpError::generic(format!("JSON parse error, {e}")),
        id: None,
    })?;
    let Value::Object(mut obj) = value else {
        return Err(RequestError {
            error: QmpError::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = obj.remove("id");
    let fail = |desc: String| RequestError {
        error: QmpError::generic(desc),
        id: id.clone(),
    };
    let mut name = None;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => name = Some(s),
                _ => return Err(fail("QMP input member 'execute' must be a string".into())),
            },
            "arguments" => match value {
                Value::Object(m) => arguments = m,
                _ => {
                    return Err(fail(
                        "QMP input member 'arguments' must be an object".into(),
                    ))
                }
            },
            "exec-oob" => {
                return Err(fail(
                    "QMP input member 'exec-oob' is unexpected: out-of-band is not enabled".into(),
                ))
            }
            other => return Err(fail(format!("QMP input member '{other}' is unexpected"))),
        }
    }
    match name {
        Some(name) => Ok(Request {
            name,
            arguments,
            id,
        }),
        None => Err(fail("QMP input lacks member 'execute'".into())),
    }
}

/// Wall-clock time of an event, as QMP sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs(),
            microseconds: d.subsec_micros(),
        }
    }
}

/// An asynchronous event: `{"event": name, "data"?: data, "timestamp": ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `"MIGRATION"`.
    pub name: String,
    /// Event data; omitted from the message when `None`.
    pub data: Option<Value>,
    /// When the event happened.
    pub timestamp: Timestamp,
}

impl Event {
    /// An event stamped with the current wall-clock time.
    pub fn new(name: impl Into<String>, data: Option<Value>) -> Self {
        Event {
            name: name.into(),
            data,
            timestamp: Timestamp::now(),
        }
    }

    /// The event as a JSON object.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.wire()).unwrap_or(Value::Null)
    }

    /// The event as wire bytes (ASCII JSON + CRLF).
    pub fn encode(&self) -> Vec<u8> {
        encode_message(&self.wire())
    }

    fn wire(&self) -> WireEvent<'_> {
        WireEvent {
            event: &self.name,
            data: self.data.as_ref(),
            timestamp: self.timestamp,
        }
    }
}

/// An event in wire order: event, data, timestamp.
#[derive(Serialize)]
struct WireEvent<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    timestamp: Timestamp,
}

/// `{"return": value, "id"?: id}` as wire bytes.
pub fn encode_return(value: Value, id: Option<&Value>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Return<'a> {
        #[serde(rename = "return")]
        value: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
    }
    encode_message(&Return { value, id })
}

/// `{"error": {"class", "desc"}, "id"?: id}` as wire bytes.
pub fn encode_error(error: &QmpError, id: Option<&Value>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Error<'a> {
        error: &'a QmpError,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
    }
    encode_message(&Error { error, id })
}

/// One server message: `value` as ASCII-only JSON spaced as QEMU's, then
/// `"\r\n"`.
pub fn encode_message<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    // Our messages always serialize (string keys, infallible writer); fall
    // back to a valid message all the same.
    if value.serialize(&mut ser).is_err() {
        out.clear();
        out.extend_from_slice(
            br#"{"error": {"class": "GenericError", "desc": "internal encoding error"}}"#,
        );
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// QEMU's JSON layout: one line, `": "` after keys, `", "` between members
/// and elements; every non-ASCII character escaped as `\uXXXX`.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &str) -> RequestError {
        match parse_request(input.as_bytes()) {
            Ok(r) => panic!("{input} parsed as {r:?}"),
            Err(e) => e,
        }
    }

    fn assert_generic(input: &str, desc: &str, id: Option<Value>) {
        let e = err(input);
        assert_eq!(e.error.class, ErrorClass::GenericError, "{input}");
        assert!(
            e.error.desc.contains(desc),
            "{input}: {:?} lacks {desc:?}",
            e.error.desc
        );
        assert_eq!(e.id, id, "{input}");
    }

    #[test]
    fn good_requests() {
        let r = parse_request(br#"{"execute": "query-status"}"#).unwrap();
        assert_eq!(r.name, "query-status");
        assert!(r.arguments.is_empty());
        assert_eq!(r.id, None);

        let r = parse_request(
            br#"{"execute": "migrate", "arguments": {"uri": "tcp:0:4444"}, "id": {"a": [1]}}"#,
        )
        .unwrap();
        assert_eq!(r.name, "migrate");
        assert_eq!(r.arguments["uri"], "tcp:0:4444");
        assert_eq!(r.id, Some(json!({"a": [1]})));

        let r = parse_request(br#"{"id": null, "execute": "stop"}"#).unwrap();
        assert_eq!(r.id, Some(Value::Null));
    }

    #[test]
    fn bad_requests() {
        assert_generic("{", "JSON parse error, ", None);
        assert_generic("{\"execute\": 'x'}", "JSON parse error, ", None);
        assert_generic("[1, 2]", "QMP input must be a JSON object", None);
        assert_generic("42", "QMP input must be a JSON object", None);
        assert_generic(
            r#"{"id": 7}"#,
            "QMP input lacks member 'execute'",
            Some(json!(7)),
        );
        assert_generic(
            r#"{"execute": 5, "id": "x"}"#,
            "QMP input member 'execute' must be a string",
            Some(json!("x")),
        );
        assert_generic(
            r#"{"execute": "stop", "foo": 1}"#,
            "QMP input member 'foo' is unexpected",
            None,
        );
        assert_generic(
            r#"{"execute": "stop", "arguments": [1]}"#,
            "QMP input member 'arguments' must be an object",
            None,
        );
        assert_generic(
            r#"{"exec-oob": "migrate-pause", "id": 1}"#,
            "out-of-band is not enabled",
            Some(json!(1)),
        );
    }

    #[test]
    fn non_utf8_is_a_parse_error() {
        let e = parse_request(b"{\"execute\": \"\xff\xfe\"}").unwrap_err();
        assert!(e.error.desc.starts_with("JSON parse error, "), "{e}");
        assert_eq!(e.id, None);
    }

    #[test]
    fn encodings() {
        let r = encode_return(json!({}), Some(&json!("a")));
        assert_eq!(r, b"{\"return\": {}, \"id\": \"a\"}\r\n");
        let e = encode_error(&QmpError::command_not_found("nope"), None);
        assert_eq!(
            e,
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\r\n"
        );
        let l = encode_return(json!({"a": [1, 2], "b": []}), None);
        assert_eq!(l, b"{\"return\": {\"a\": [1, 2], \"b\": []}}\r\n");
        let m = encode_message(&json!({"s": "caf\u{e9} \u{1f600} \"q\"\n"}));
        let ev = Event::new("X", Some(json!({"a": 1}))).encode();
        assert!(ev.starts_with(
            b"{\"event\": \"X\", \"data\": {\"a\": 1}, \"timestamp\": {\"seconds\": "
        ));
        assert!(m.is_ascii());
        let back: Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(back["s"], "caf\u{e9} \u{1f600} \"q\"\n");
        assert!(String::from_utf8_lossy(&m).contains("\\ud83d\\ude00"));
    }

    #[test]
    fn greeting_and_events() {
        let v = VersionInfo::default();
        let g = greeting(&v);
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
        assert!(g["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("minivmm "));

        let e = Event::new("STOP", None).to_json();
        assert_eq!(e["event"], "STOP");
        assert!(e.get("data").is_none());
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        let e = Event::new("MIGRATION", Some(json!({"status": "active"}))).to_json();
        assert_eq!(e["data"]["status"], "active");
    }
}

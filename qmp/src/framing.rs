//! Cutting a byte stream into JSON texts.
//!
//! QMP has no length prefix: a peer sends JSON values back to back, usually
//! one per line, but nothing forbids several on one line or one split over
//! many reads (or many lines). Like QEMU's json-streamer, [`JsonSplitter`]
//! tracks nesting and strings byte by byte and hands out each top-level
//! value as soon as its last byte arrives; it never parses. A top-level
//! scalar (`42`, `true`, garbage) ends at whitespace or at the next `{`/`[`,
//! and is handed out too, so the caller can answer it with a parse error.
//!
//! A value that grows beyond the configured limit without ending is an
//! [`Overflow`]: the caller decides what to do (the server closes the
//! connection, as QEMU does).

/// A top-level value grew beyond the splitter's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("input exceeds {limit} bytes without a complete JSON value")]
pub struct Overflow {
    /// The limit that was exceeded, in bytes.
    pub limit: usize,
}

/// Incremental splitter of a byte stream into top-level JSON texts.
#[derive(Debug)]
pub struct JsonSplitter {
    buf: Vec<u8>,
    limit: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Inside a top-level scalar token (not a string).
    in_scalar: bool,
}

impl JsonSplitter {
    /// A splitter that refuses values longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        JsonSplitter {
            buf: Vec::new(),
            limit,
            depth: 0,
            in_string: false,
            escaped: false,
            in_scalar: false,
        }
    }

    /// Bytes of the value currently being accumulated.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feeds `data`; appends every completed value to `out`.
    ///
    /// On [`Overflow`] the values completed before the overflow are in `out`
    /// and the splitter is reset (the oversized value is dropped).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), Overflow> {
        for &b in data {
            self.push_byte(b, out);
            if self.buf.len() > self.limit {
                self.reset();
                return Err(Overflow { limit: self.limit });
            }
        }
        Ok(())
    }

    /// Ends the stream: returns the incomplete value left over, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let rest = std::mem::take(&mut self.buf);
        self.reset();
        (!rest.is_empty()).then_some(rest)
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.in_scalar = false;
    }

    fn emit(&mut self, out: &mut Vec<Vec<u8>>) {
        out.push(std::mem::take(&mut self.buf));
        self.in_scalar = false;
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Vec<u8>>) {
        if self.in_string {
            self.buf.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            return;
        }
        if self.depth > 0 {
            self.buf.push(b);
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.emit(out);
                    }
                }
                _ => {}
            }
            return;
        }
        // Top level, between values or inside a scalar token.
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if self.in_scalar {
                    self.emit(out);
                }
            }
            b'{' | b'[' => {
                if self.in_scalar {
                    self.emit(out);
                }
                self.buf.push(b);
                self.depth = 1;
            }
            b'"' => {
                if self.in_scalar {
                    self.emit(out);
                }
                self.buf.push(b);
                self.in_string = true;
            }
            b'}' | b']' => {
                // A stray closer: hand it out alone so it gets a parse error.
                if self.in_scalar {
                    self.emit(out);
                }
                self.buf.push(b);
                self.emit(out);
            }
            _ => {
                self.buf.push(b);
                self.in_scalar = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = JsonSplitter::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out).unwrap();
        }
        if let Some(rest) = s.finish() {
            out.push(rest);
        }
        out.into_iter()
            .map(|v| String::from_utf8(v).unwrap())
            .collect()
    }

    #[test]
    fn one_per_line() {
        assert_eq!(
            split(&[b"{\"a\": 1}\r\n{\"b\": [2, {}]}\n"]),
            vec!["{\"a\": 1}", "{\"b\": [2, {}]}"]
        );
    }

    #[test]
    fn several_on_one_line_and_split_over_reads() {
        assert_eq!(split(&[b"{}{\"x\":1}  {"]), vec!["{}", "{\"x\":1}", "{"]);
        assert_eq!(
            split(&[b"{\"exe", b"cute\": \"st", b"op\"", b"}"]),
            vec!["{\"execute\": \"stop\"}"]
        );
        assert_eq!(split(&[b"{\n\"a\":\n1\n}\n"]), vec!["{\n\"a\":\n1\n}"]);
    }

    #[test]
    fn braces_and_quotes_inside_strings() {
        assert_eq!(
            split(&[br#"{"a": "}{\"]["} {"b": "\\"}"#]),
            vec![r#"{"a": "}{\"]["}"#, r#"{"b": "\\"}"#]
        );
    }

    #[test]
    fn scalars_and_stray_closers() {
        assert_eq!(
            split(&[b"42 true\n\"s\"} [1]x"]),
            vec!["42", "true", "\"s\"", "}", "[1]", "x"]
        );
    }

    #[test]
    fn overflow() {
        let mut s = JsonSplitter::new(16);
        let mut out = Vec::new();
        s.push(b"{} {\"a\": \"", &mut out).unwrap();
        assert_eq!(s.pending(), 7);
        let e = s.push(b"0123456789abcdef", &mut out).unwrap_err();
        assert_eq!(e.limit, 16);
        assert_eq!(out, vec![b"{}".to_vec()]);
        // Reset after overflow; whitespace between values costs nothing.
        s.push(&[b' '; 100], &mut out).unwrap();
        assert_eq!(s.pending(), 0);
    }
}

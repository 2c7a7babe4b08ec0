//! One log record, one line: the log writer escapes every control character
//! a record carries (a peer's username, a `direct-tcpip` host, an env or
//! subsystem name, an OIDC claim can hold a newline or a terminal escape),
//! so no peer can forge a log line or drive the operator's terminal. The
//! record's own final newline is kept.
//!
//! The audit trail is JSON lines written by serde, which escapes the same
//! characters itself.

use std::io::{self, Write};

/// Escapes `bytes` for one log line: C0 controls (but tab), DEL and ESC as
/// `\n`, `\r` or `\x1b`-style text. A final `\n` stays a newline.
pub fn escape(bytes: &[u8]) -> Vec<u8> {
    let (body, newline) = match bytes.split_last() {
        Some((b'\n', body)) => (body, true),
        _ => (bytes, false),
    };
    let mut out = Vec::with_capacity(bytes.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    if newline {
        out.push(b'\n');
    }
    out
}

/// A writer that escapes each write with [`escape`] (tracing's fmt layer
/// writes one whole record per call).
pub struct OneLine<W: Write>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `make_writer` for tracing-subscriber: standard error, one line a record.
pub fn stderr() -> OneLine<io::Stderr> {
    OneLine(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_stays_one_line_whatever_it_carries() {
        let forged = b"INFO refused: job-1\nINFO authenticated login=admin\r\x1b[2J\x07\tend\n";
        let out = escape(forged);
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(text.contains("job-1\\nINFO authenticated"), "{text}");
        assert!(text.contains("\\r\\x1b[2J\\x07\tend"), "{text}");
        assert_eq!(escape(b"plain"), b"plain");
        assert_eq!(escape("ünïcode ok\n".as_bytes()), "ünïcode ok\n".as_bytes());
    }

    #[test]
    fn the_writer_reports_the_bytes_it_was_given() {
        let mut w = OneLine(Vec::new());
        assert_eq!(w.write(b"a\nb\n").expect("write"), 4);
        assert_eq!(w.0, b"a\\nb\n");
    }
}

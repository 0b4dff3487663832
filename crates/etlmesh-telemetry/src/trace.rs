//! W3C trace context (`traceparent: 00-<trace id>-<parent id>-<flags>`): parsed from
//! requests, created when absent, and passed on with a new span id at each hop.

use std::fmt;

/// A trace id, a span id and the sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 128-bit trace id (never zero).
    pub trace_id: u128,
    /// 64-bit id of the current span (never zero).
    pub span_id: u64,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

fn nonzero_u128() -> u128 {
    loop {
        let v: u128 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

impl TraceContext {
    /// A new trace.
    pub fn new_root() -> Self {
        let trace_id = nonzero_u128();
        Self {
            trace_id,
            span_id: nonzero_u64(),
            sampled: crate::sampler::current().sampled(trace_id, None),
        }
    }

    /// Parses a `traceparent` header; `None` when it is malformed (a new trace starts then).
    pub fn parse(header: &str) -> Option<Self> {
        let parts: Vec<&str> = header.trim().split('-').collect();
        if parts.len() < 4
            || parts[0].len() != 2
            || parts[1].len() != 32
            || parts[2].len() != 16
            || parts[3].len() != 2
        {
            return None;
        }
        if parts[0] == "ff" || (parts[0] == "00" && parts.len() != 4) {
            return None;
        }
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !parts[1..4].iter().all(|p| hex(p)) {
            return None;
        }
        let trace_id = u128::from_str_radix(parts[1], 16).ok()?;
        let span_id = u64::from_str_radix(parts[2], 16).ok()?;
        let flags = u8::from_str_radix(parts[3], 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context from a header, or a new trace.
    pub fn from_header_or_new(header: Option<&str>) -> Self {
        header.and_then(Self::parse).unwrap_or_else(Self::new_root)
    }

    /// The same trace with a new span (the next hop's parent), sampled as this
    /// process's sampler says of a trace whose caller decided `self.sampled`.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_u64(),
            sampled: crate::sampler::current().sampled(self.trace_id, Some(self.sampled)),
            ..*self
        }
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// The trace id in hex, as logs and error bodies show it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_children() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(h).expect("valid");
        assert_eq!(t.header(), h);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
    }

    #[test]
    fn malformed_headers_start_a_new_trace() {
        for h in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-xyz",
        ] {
            assert!(TraceContext::parse(h).is_none(), "{h}");
        }
        assert_ne!(TraceContext::from_header_or_new(Some("junk")).trace_id, 0);
    }
}

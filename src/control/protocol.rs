//! The control pipe's line protocol: request parsing, line framing, replies and dispatch.
//!
//! A client sends one request per line (at most [`MAX_LINE`] bytes including the `'\n'`; a
//! trailing `'\r'` is tolerated) and gets exactly one reply line for each: `ok [key=value...]` or
//! `error <message>`. Words are separated by spaces or tabs. Requests:
//!
//! ```text
//! resize [cpus=N] [mem=SIZE]   change the vCPU count and/or the RAM size (at least one key)
//! info                         report the VM's current and pending sizes
//! reboot | shutdown            reset or stop the VM
//! powerbutton                  press the ACPI power button
//! watch                        subscribe this connection to event lines ("event <name> k=v...")
//! ping                         liveness check, replies "ok pong"
//! help                         list the commands
//! ```
//!
//! Everything here is pure logic; the VMM owns the descriptors and implements [`ControlTarget`].

use crate::config::size::{format_size, parse_size, SizeError};

/// Longest request line accepted, including its terminating `'\n'`.
pub const MAX_LINE: usize = 4096;

/// Longest piece of client input quoted back in an error message (in characters).
const MAX_QUOTED: usize = 40;

/// A parsed control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Change the vCPU count and/or the RAM size (bytes); at least one is `Some`.
    Resize {
        /// Requested number of vCPUs (at least 1).
        cpus: Option<u32>,
        /// Requested RAM size in bytes (at least 1).
        mem: Option<u64>,
    },
    /// Report the VM state.
    Info,
    /// Reset the VM.
    Reboot,
    /// Stop the VM and exit.
    Shutdown,
    /// Press the ACPI power button.
    PowerButton,
    /// Subscribe the connection to event lines.
    Watch,
    /// Liveness check.
    Ping,
    /// List the commands.
    Help,
}

/// Why a request line was refused; `Display` is the message sent after `error `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The line holds nothing but blanks.
    #[error("empty request (try help)")]
    Empty,
    /// The line is longer than [`MAX_LINE`] bytes.
    #[error("request is longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not UTF-8.
    #[error("request is not valid UTF-8")]
    NotUtf8,
    /// The first word is not a command (quoted and escaped).
    #[error("unknown command {0} (try help)")]
    UnknownCommand(String),
    /// A command without arguments was given some.
    #[error("{0} takes no arguments")]
    UnexpectedArguments(&'static str),
    /// `resize` without any key.
    #[error("resize needs cpus=N and/or mem=SIZE")]
    ResizeNeedsKey,
    /// A `resize` argument with an unknown key (quoted and escaped).
    #[error("unknown key {0} for resize (expected cpus=N, mem=SIZE)")]
    UnknownKey(String),
    /// `cpus` or `mem` without a value.
    #[error("missing value for {0}")]
    MissingValue(&'static str),
    /// The same key twice.
    #[error("duplicate key {0}")]
    DuplicateKey(&'static str),
    /// `cpus=0`.
    #[error("cpus=0 is invalid: a VM needs at least one vCPU")]
    ZeroCpus,
    /// `mem=0`.
    #[error("mem=0 is invalid: a VM needs memory")]
    ZeroMem,
    /// `cpus=` is not a decimal number that fits 32 bits (quoted and escaped).
    #[error("invalid number {0} for cpus")]
    InvalidNumber(String),
    /// `mem=` is not a valid SIZE.
    #[error(transparent)]
    InvalidSize(SizeError),
}

/// Quotes client input for an error message: escaped (so it stays on one line) and shortened.
fn quote(s: &str) -> String {
    if s.chars().count() > MAX_QUOTED {
        let short: String = s.chars().take(MAX_QUOTED).collect();
        format!("{short:?}...")
    } else {
        format!("{s:?}")
    }
}

/// Parses one request line. A trailing `"\n"`, `"\r\n"` or `"\r"` is ignored.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() >= MAX_LINE {
        return Err(RequestError::TooLong);
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    let Some(command) = words.next() else {
        return Err(RequestError::Empty);
    };
    let simple = match command {
        "resize" => return parse_resize(words),
        "info" => Request::Info,
        "reboot" => Request::Reboot,
        "shutdown" => Request::Shutdown,
        "powerbutton" => Request::PowerButton,
        "watch" => Request::Watch,
        "ping" => Request::Ping,
        "help" => Request::Help,
        _ => return Err(RequestError::UnknownCommand(quote(command))),
    };
    if words.next().is_some() {
        return Err(RequestError::UnexpectedArguments(command_name(simple)));
    }
    Ok(simple)
}

/// The command word of a request.
fn command_name(request: Request) -> &'static str {
    match request {
        Request::Resize { .. } => "resize",
        Request::Info => "info",
        Request::Reboot => "reboot",
        Request::Shutdown => "shutdown",
        Request::PowerButton => "powerbutton",
        Request::Watch => "watch",
        Request::Ping => "ping",
        Request::Help => "help",
    }
}

fn parse_resize<'a>(words: impl Iterator<Item = &'a str>) -> Result<Request, RequestError> {
    let mut cpus = None;
    let mut mem = None;
    for word in words {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "cpus" => {
                if value.is_empty() {
                    return Err(RequestError::MissingValue("cpus"));
                }
                if cpus.is_some() {
                    return Err(RequestError::DuplicateKey("cpus"));
                }
                if !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(RequestError::InvalidNumber(quote(value)));
                }
                let n: u32 = value
                    .parse()
                    .map_err(|_| RequestError::InvalidNumber(quote(value)))?;
                if n == 0 {
                    return Err(RequestError::ZeroCpus);
                }
                cpus = Some(n);
            }
            "mem" => {
                if value.is_empty() {
                    return Err(RequestError::MissingValue("mem"));
                }
                if mem.is_some() {
                    return Err(RequestError::DuplicateKey("mem"));
                }
                let bytes = parse_size(value).map_err(|e| {
                    RequestError::InvalidSize(match e {
                        SizeError::Invalid(_) => SizeError::Invalid(shorten(value)),
                        SizeError::Overflow(_) => SizeError::Overflow(shorten(value)),
                    })
                })?;
                if bytes == 0 {
                    return Err(RequestError::ZeroMem);
                }
                mem = Some(bytes);
            }
            _ => return Err(RequestError::UnknownKey(quote(key))),
        }
    }
    if cpus.is_none() && mem.is_none() {
        return Err(RequestError::ResizeNeedsKey);
    }
    Ok(Request::Resize { cpus, mem })
}

/// Client input cut to [`MAX_QUOTED`] characters (for messages that quote it themselves).
fn shorten(s: &str) -> String {
    s.chars().take(MAX_QUOTED).collect()
}

/// One framed line from a client byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A complete line without its `'\n'` (a `'\r'` before it is kept; [`parse_request`] drops it).
    Complete(Vec<u8>),
    /// A line longer than [`MAX_LINE`] bytes; reported once, its bytes are discarded.
    TooLong,
}

/// Splits a client's byte stream into lines, buffering at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineReader {
    /// Start of the current line (always shorter than `MAX_LINE`).
    partial: Vec<u8>,
    /// The current line was already reported too long: drop bytes up to the next `'\n'`.
    discarding: bool,
}

impl LineReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes read from the client; returns the complete lines found (in order). A line longer than MAX_LINE is
    /// reported ONCE as Line::TooLong and the rest of it discarded up to its '\n'; never buffers more than MAX_LINE.
    ///
    /// A line is reported too long as soon as it is known to be, even before its `'\n'` arrives.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !bytes.is_empty() {
            let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
                if !self.discarding {
                    // Without its '\n' the line already has partial + bytes bytes.
                    if self.partial.len() + bytes.len() >= MAX_LINE {
                        self.partial.clear();
                        self.discarding = true;
                        lines.push(Line::TooLong);
                    } else {
                        self.partial.extend_from_slice(bytes);
                    }
                }
                break;
            };
            let head = &bytes[..newline];
            bytes = &bytes[newline + 1..];
            if self.discarding {
                self.discarding = false;
            } else if self.partial.len() + head.len() + 1 > MAX_LINE {
                self.partial.clear();
                lines.push(Line::TooLong);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                lines.push(Line::Complete(line));
            }
        }
        lines
    }

    /// True when a partial line is buffered (client disconnected mid-line).
    ///
    /// The rest of a line already reported as [`Line::TooLong`] is not buffered and does not count.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }
}

/// Makes a reply token safe: whitespace and control characters become `'_'`.
fn reply_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// `"ok k=v k=v\n"`, or `"ok\n"` without fields. Whitespace and control characters in keys and
/// values are replaced by `'_'` so that the reply stays one line of space-separated fields.
pub fn ok_reply(fields: &[(&str, String)]) -> String {
    let mut reply = String::from("ok");
    for (key, value) in fields {
        reply.push(' ');
        reply.push_str(&reply_token(key));
        reply.push('=');
        reply.push_str(&reply_token(value));
    }
    reply.push('\n');
    reply
}

/// `"error <msg>\n"`. Line breaks and other control characters in `msg` become single spaces.
pub fn error_reply(msg: &str) -> String {
    let mut reply = String::from("error");
    for word in msg
        .split(|c: char| c.is_control() || c == ' ')
        .filter(|w| !w.is_empty())
    {
        reply.push(' ');
        reply.push_str(word);
    }
    reply.push('\n');
    reply
}

/// The VM state reported by `info` (and, in part, by `resize`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    /// VM state, e.g. `"running"`.
    pub state: &'static str,
    /// vCPUs present now.
    pub cpus: u32,
    /// Requested vCPU count; differs from `cpus` while a removal waits for the guest's eject.
    pub pending_cpus: u32,
    /// Most vCPUs the VM can have.
    pub max_cpus: u32,
    /// RAM the guest has now, in bytes.
    pub mem: u64,
    /// RAM after the next reboot, in bytes.
    pub pending_mem: u64,
    /// Most RAM the VM can have (boot RAM plus the hotplug window), in bytes.
    pub max_mem: u64,
    /// Memory hotplug slots left this boot.
    pub hotplug_slots_free: u32,
    /// vCPUs waiting for the guest's eject.
    pub removing: Vec<u32>,
    /// Memory slots waiting for the guest's eject (a live shrink removes one at a time).
    pub removing_mem: Vec<u32>,
    /// The guest's last hotplug status report (`_OST`), e.g. `cpu2:eject:busy`.
    pub last_ost: Option<String>,
    /// Time since minivmm started.
    pub uptime: std::time::Duration,
    /// Time from this boot's start to the guest's first debug-port write, if it wrote.
    pub boot_marker: Option<std::time::Duration>,
}

/// The VM as seen by the control pipe; the VMM implements it.
pub trait ControlTarget {
    /// Why a request was refused; its message is returned to the client after `error `.
    type Error: std::fmt::Display;
    /// The current VM state.
    fn info(&self) -> VmInfo;
    /// Validates everything first; applies nothing on error.
    fn resize(&mut self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, Self::Error>;
    /// Resets the VM.
    fn reboot(&mut self) -> Result<(), Self::Error>;
    /// Stops the VM.
    fn shutdown(&mut self) -> Result<(), Self::Error>;
    /// Presses the ACPI power button.
    fn power_button(&mut self) -> Result<(), Self::Error>;
}

fn resize_reply(info: &VmInfo) -> String {
    ok_reply(&[
        ("cpus", info.cpus.to_string()),
        ("pending_cpus", info.pending_cpus.to_string()),
        ("mem", format_size(info.mem)),
        ("pending_mem", format_size(info.pending_mem)),
    ])
}

/// vCPU indices as replies write them: `1,2,3`.
pub(crate) fn format_ids(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// A list of ids, or `none`.
fn ids_or_none(ids: &[u32]) -> String {
    if ids.is_empty() {
        "none".to_string()
    } else {
        format_ids(ids)
    }
}

fn info_reply(info: &VmInfo) -> String {
    ok_reply(&[
        ("state", info.state.to_string()),
        ("cpus", info.cpus.to_string()),
        ("pending_cpus", info.pending_cpus.to_string()),
        ("max_cpus", info.max_cpus.to_string()),
        ("mem", format_size(info.mem)),
        ("pending_mem", format_size(info.pending_mem)),
        ("max_mem", format_size(info.max_mem)),
        ("hotplug_slots_free", info.hotplug_slots_free.to_string()),
        ("removing", ids_or_none(&info.removing)),
        ("removing_mem", ids_or_none(&info.removing_mem)),
        (
            "last_ost",
            info.last_ost.clone().unwrap_or_else(|| "none".into()),
        ),
        ("uptime", format!("{:.3}", info.uptime.as_secs_f64())),
        (
            "boot_ms",
            info.boot_marker
                .map(|d| d.as_millis().to_string())
                .unwrap_or_else(|| "none".into()),
        ),
    ])
}

fn help_reply() -> String {
    ok_reply(&[
        (
            "commands",
            "resize,info,reboot,shutdown,powerbutton,watch,ping,help".to_string(),
        ),
        ("resize_args", "cpus=N,mem=SIZE".to_string()),
    ])
}

/// The answer to one request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply line, with its `'\n'`.
    pub line: String,
    /// The connection asked to receive event lines from now on (`watch`).
    pub subscribe: bool,
}

/// Parses one line (as returned by LineReader) and returns exactly one reply line.
pub fn handle_line<T: ControlTarget + ?Sized>(line: &[u8], target: &mut T) -> String {
    respond(line, target).line
}

/// Parses one line and answers it: [`handle_line`] with whether the client subscribed to events.
pub fn respond<T: ControlTarget + ?Sized>(line: &[u8], target: &mut T) -> Reply {
    let reply = |line: String| Reply {
        line,
        subscribe: false,
    };
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(e) => return reply(error_reply(&e.to_string())),
    };
    let done = |result: Result<(), T::Error>, ok: &str| match result {
        Ok(()) => ok.to_string(),
        Err(e) => error_reply(&e.to_string()),
    };
    reply(match request {
        Request::Resize { cpus, mem } => match target.resize(cpus, mem) {
            Ok(info) => resize_reply(&info),
            Err(e) => error_reply(&e.to_string()),
        },
        Request::Info => info_reply(&target.info()),
        Request::Reboot => done(target.reboot(), "ok rebooting\n"),
        Request::Shutdown => done(target.shutdown(), "ok shutting down\n"),
        Request::PowerButton => done(target.power_button(), "ok\n"),
        Request::Watch => {
            return Reply {
                line: "ok watching\n".to_string(),
                subscribe: true,
            }
        }
        Request::Ping => "ok pong\n".to_string(),
        Request::Help => help_reply(),
    })
}

/// Replies to one framed [`Line`]: [`respond`] for a complete line, an error for an over-long one.
pub fn handle<T: ControlTarget + ?Sized>(line: &Line, target: &mut T) -> Reply {
    match line {
        Line::Complete(bytes) => respond(bytes, target),
        Line::TooLong => Reply {
            line: error_reply(&RequestError::TooLong.to_string()),
            subscribe: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(line: &str) -> String {
        match parse_request(line.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("{line:?}: expected an error, got {r:?}"),
        }
    }

    #[test]
    fn parses_every_command() {
        let cases = [
            ("info", Request::Info),
            ("reboot", Request::Reboot),
            ("shutdown", Request::Shutdown),
            ("powerbutton", Request::PowerButton),
            ("watch", Request::Watch),
            ("ping", Request::Ping),
            ("help", Request::Help),
            (
                "resize cpus=4",
                Request::Resize {
                    cpus: Some(4),
                    mem: None,
                },
            ),
            (
                "resize mem=1536M",
                Request::Resize {
                    cpus: None,
                    mem: Some(1536 << 20),
                },
            ),
            (
                "resize mem=2GiB cpus=1",
                Request::Resize {
                    cpus: Some(1),
                    mem: Some(2 << 30),
                },
            ),
            (
                " \t resize\tcpus=2  mem=1g \t",
                Request::Resize {
                    cpus: Some(2),
                    mem: Some(1 << 30),
                },
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_request(line.as_bytes()), Ok(expected), "{line:?}");
        }
    }

    #[test]
    fn line_endings_are_tolerated() {
        for line in ["ping", "ping\n", "ping\r", "ping\r\n", "  ping \r\n"] {
            assert_eq!(
                parse_request(line.as_bytes()),
                Ok(Request::Ping),
                "{line:?}"
            );
        }
        // Only one trailing '\r' is part of the line ending.
        assert_eq!(
            parse_err("ping\r\r"),
            "unknown command \"ping\\r\" (try help)"
        );
        assert_eq!(
            parse_err("pi\rng"),
            "unknown command \"pi\\rng\" (try help)"
        );
    }

    #[test]
    fn request_errors() {
        assert_eq!(parse_err(""), "empty request (try help)");
        assert_eq!(parse_err(" \t \r\n"), "empty request (try help)");
        assert_eq!(parse_err("foo"), "unknown command \"foo\" (try help)");
        assert_eq!(parse_err("INFO"), "unknown command \"INFO\" (try help)");
        assert_eq!(parse_err("resize"), "resize needs cpus=N and/or mem=SIZE");
        assert_eq!(
            parse_err("resize foo=1"),
            "unknown key \"foo\" for resize (expected cpus=N, mem=SIZE)"
        );
        assert_eq!(
            parse_err("resize CPUS=1"),
            "unknown key \"CPUS\" for resize (expected cpus=N, mem=SIZE)"
        );
        assert_eq!(
            parse_err("resize 4"),
            "unknown key \"4\" for resize (expected cpus=N, mem=SIZE)"
        );
        assert_eq!(parse_err("resize cpus"), "missing value for cpus");
        assert_eq!(parse_err("resize cpus="), "missing value for cpus");
        assert_eq!(parse_err("resize mem="), "missing value for mem");
        assert_eq!(
            parse_err("resize cpus=0"),
            "cpus=0 is invalid: a VM needs at least one vCPU"
        );
        assert_eq!(
            parse_err("resize mem=0G"),
            "mem=0 is invalid: a VM needs memory"
        );
        assert_eq!(
            parse_err("resize cpus=two"),
            "invalid number \"two\" for cpus"
        );
        assert_eq!(
            parse_err("resize cpus=-1"),
            "invalid number \"-1\" for cpus"
        );
        assert_eq!(
            parse_err("resize cpus=+1"),
            "invalid number \"+1\" for cpus"
        );
        assert_eq!(
            parse_err("resize cpus=4294967296"),
            "invalid number \"4294967296\" for cpus"
        );
        assert!(parse_err("resize mem=12Q").starts_with("invalid size \"12Q\""));
        assert_eq!(
            parse_err("resize mem=99999999999T"),
            "size \"99999999999T\" is too large"
        );
        assert_eq!(parse_err("resize cpus=1 cpus=2"), "duplicate key cpus");
        assert_eq!(parse_err("resize mem=1G mem=1G"), "duplicate key mem");
        assert_eq!(parse_err("info now"), "info takes no arguments");
        assert_eq!(parse_err("ping pong"), "ping takes no arguments");
        assert_eq!(parse_err("powerbutton x"), "powerbutton takes no arguments");
        assert_eq!(parse_request(b"info \xff\xfe"), Err(RequestError::NotUtf8));
        assert_eq!(
            RequestError::NotUtf8.to_string(),
            "request is not valid UTF-8"
        );
    }

    #[test]
    fn quoted_input_is_escaped_and_bounded() {
        let long = "x".repeat(1000);
        let msg = parse_err(&long);
        assert_eq!(
            msg,
            format!("unknown command \"{}\"... (try help)", "x".repeat(40))
        );
        let msg = parse_err("resize \"\u{1b}[2J=1");
        assert_eq!(
            msg,
            "unknown key \"\\\"\\u{1b}[2J\" for resize (expected cpus=N, mem=SIZE)"
        );
        let msg = parse_err(&format!("resize mem={long}"));
        assert!(
            msg.starts_with(&format!("invalid size \"{}\"", "x".repeat(40))),
            "{msg}"
        );
    }

    #[test]
    fn parse_request_enforces_the_length_limit() {
        let mut line = vec![b' '; MAX_LINE - 5];
        line.extend_from_slice(b"ping\n");
        assert_eq!(line.len(), MAX_LINE);
        assert_eq!(parse_request(&line), Ok(Request::Ping));
        assert_eq!(parse_request(&line[..MAX_LINE - 1]), Ok(Request::Ping));
        line.insert(0, b' ');
        assert_eq!(parse_request(&line), Err(RequestError::TooLong));
        assert_eq!(parse_request(&line[..MAX_LINE]), Err(RequestError::TooLong));
        assert_eq!(
            RequestError::TooLong.to_string(),
            "request is longer than 4096 bytes"
        );
    }

    fn complete(s: &str) -> Line {
        Line::Complete(s.as_bytes().to_vec())
    }

    #[test]
    fn line_reader_splits_and_joins() {
        let mut reader = LineReader::new();
        assert_eq!(reader.push(b""), vec![]);
        assert_eq!(reader.push(b"in"), vec![]);
        assert!(reader.has_partial());
        assert_eq!(
            reader.push(b"fo\nping\r\nresize "),
            vec![complete("info"), complete("ping\r")]
        );
        assert!(reader.has_partial());
        assert_eq!(reader.push(b"cpus=2\n"), vec![complete("resize cpus=2")]);
        assert!(!reader.has_partial());
        assert_eq!(
            reader.push(b"\n\na\nb"),
            vec![complete(""), complete(""), complete("a")]
        );
        assert!(reader.has_partial());
        assert_eq!(reader.push(b"\n"), vec![complete("b")]);
        assert!(!reader.has_partial());
    }

    #[test]
    fn line_reader_byte_by_byte() {
        let mut reader = LineReader::new();
        let mut lines = Vec::new();
        for b in b"resize mem=1G\nping\n" {
            lines.extend(reader.push(std::slice::from_ref(b)));
        }
        assert_eq!(lines, vec![complete("resize mem=1G"), complete("ping")]);
    }

    #[test]
    fn line_reader_length_limit() {
        // Exactly MAX_LINE bytes including the '\n' is accepted, in one push or split.
        let body = vec![b'a'; MAX_LINE - 1];
        let mut reader = LineReader::new();
        let mut input = body.clone();
        input.push(b'\n');
        assert_eq!(reader.push(&input), vec![Line::Complete(body.clone())]);
        assert_eq!(reader.push(&body), vec![]);
        assert_eq!(reader.push(b"\n"), vec![Line::Complete(body.clone())]);

        // One byte more is refused once, in one push, and the next line is fine.
        let mut input = vec![b'a'; MAX_LINE];
        input.extend_from_slice(b"\nping\n");
        assert_eq!(reader.push(&input), vec![Line::TooLong, complete("ping")]);

        // Split: refused as soon as the 4096th byte arrives without '\n', then discarded.
        assert_eq!(reader.push(&body), vec![]);
        assert_eq!(reader.push(b"b"), vec![Line::TooLong]);
        assert!(!reader.has_partial());
        assert_eq!(reader.push(&vec![b'c'; 10_000]), vec![]);
        assert_eq!(reader.push(b"ccc"), vec![]);
        assert!(!reader.has_partial());
        assert_eq!(reader.push(b"cc\ninfo\n"), vec![complete("info")]);

        // A long line ending in the same push as the buffered start.
        assert_eq!(reader.push(b"xy"), vec![]);
        let mut input = vec![b'z'; MAX_LINE - 2];
        input.extend_from_slice(b"\nping\n");
        assert_eq!(reader.push(&input), vec![Line::TooLong, complete("ping")]);
    }

    #[test]
    fn line_reader_memory_is_bounded() {
        let mut reader = LineReader::new();
        for _ in 0..100 {
            reader.push(&[b'q'; 1000]);
            assert!(reader.partial.len() < MAX_LINE);
        }
        assert!(reader.partial.capacity() <= 2 * MAX_LINE);
    }

    #[test]
    fn replies() {
        assert_eq!(ok_reply(&[]), "ok\n");
        assert_eq!(
            ok_reply(&[("cpus", "2".to_string()), ("mem", "1G".to_string())]),
            "ok cpus=2 mem=1G\n"
        );
        assert_eq!(ok_reply(&[("a b", "x y\nz".to_string())]), "ok a_b=x_y_z\n");
        assert_eq!(error_reply("no slot left"), "error no slot left\n");
        assert_eq!(
            error_reply("first line\nsecond line\r\n"),
            "error first line second line\n"
        );
        assert_eq!(error_reply(""), "error\n");
    }

    /// A VM stand-in recording what the handler asked for.
    struct FakeVm {
        info: VmInfo,
        fail: Option<String>,
        calls: Vec<String>,
    }

    impl FakeVm {
        fn new() -> Self {
            FakeVm {
                info: VmInfo {
                    state: "running",
                    cpus: 2,
                    pending_cpus: 2,
                    max_cpus: 8,
                    mem: 512 << 20,
                    pending_mem: 512 << 20,
                    max_mem: 4 << 30,
                    hotplug_slots_free: 28,
                    removing: vec![],
                    removing_mem: vec![],
                    last_ost: None,
                    uptime: std::time::Duration::from_millis(12_345),
                    boot_marker: None,
                },
                fail: None,
                calls: vec![],
            }
        }

        fn outcome(&mut self, call: &str) -> Result<(), String> {
            self.calls.push(call.to_string());
            match &self.fail {
                Some(msg) => Err(msg.clone()),
                None => Ok(()),
            }
        }
    }

    impl ControlTarget for FakeVm {
        type Error = String;

        fn info(&self) -> VmInfo {
            self.info.clone()
        }

        fn resize(&mut self, cpus: Option<u32>, mem: Option<u64>) -> Result<VmInfo, String> {
            self.outcome(&format!("resize {cpus:?} {mem:?}"))?;
            if let Some(cpus) = cpus {
                self.info.removing = (cpus..self.info.cpus).collect();
                self.info.cpus = self.info.cpus.max(cpus);
                self.info.pending_cpus = cpus;
            }
            if let Some(mem) = mem {
                self.info.mem = self.info.mem.max(mem);
                self.info.pending_mem = mem;
            }
            Ok(self.info.clone())
        }

        fn reboot(&mut self) -> Result<(), String> {
            self.outcome("reboot")
        }

        fn shutdown(&mut self) -> Result<(), String> {
            self.outcome("shutdown")
        }

        fn power_button(&mut self) -> Result<(), String> {
            self.outcome("power_button")
        }
    }

    #[test]
    fn handle_line_dispatches_and_formats() {
        let mut vm = FakeVm::new();
        assert_eq!(
            handle_line(b"info\n", &mut vm),
            "ok state=running cpus=2 pending_cpus=2 max_cpus=8 mem=512M pending_mem=512M \
             max_mem=4G hotplug_slots_free=28 removing=none removing_mem=none last_ost=none uptime=12.345 \
             boot_ms=none\n"
        );
        assert_eq!(
            handle_line(b"resize mem=1536M cpus=4\r", &mut vm),
            "ok cpus=4 pending_cpus=4 mem=1536M pending_mem=1536M\n"
        );
        assert_eq!(
            handle_line(b"resize cpus=1", &mut vm),
            "ok cpus=4 pending_cpus=1 mem=1536M pending_mem=1536M\n"
        );
        assert_eq!(
            handle_line(b"info", &mut vm),
            "ok state=running cpus=4 pending_cpus=1 max_cpus=8 mem=1536M pending_mem=1536M \
             max_mem=4G hotplug_slots_free=28 removing=1,2,3 removing_mem=none last_ost=none uptime=12.345 \
             boot_ms=none\n"
        );
        vm.info.boot_marker = Some(std::time::Duration::from_micros(812_700));
        assert!(handle_line(b"info", &mut vm).ends_with(" uptime=12.345 boot_ms=812\n"));
        assert_eq!(
            respond(b"watch", &mut vm),
            Reply {
                line: "ok watching\n".into(),
                subscribe: true
            }
        );
        assert!(!respond(b"info", &mut vm).subscribe);
        assert!(!respond(b"watch now", &mut vm).subscribe);
        assert_eq!(handle_line(b"reboot", &mut vm), "ok rebooting\n");
        assert_eq!(handle_line(b"shutdown", &mut vm), "ok shutting down\n");
        assert_eq!(handle_line(b"powerbutton", &mut vm), "ok\n");
        assert_eq!(handle_line(b"ping", &mut vm), "ok pong\n");
        let help = handle_line(b"help", &mut vm);
        assert!(
            help.starts_with("ok commands=resize,info,reboot,shutdown,powerbutton,watch,ping,help"),
            "{help}"
        );
        assert_eq!(help.matches('\n').count(), 1);
        assert_eq!(
            vm.calls,
            vec![
                "resize Some(4) Some(1610612736)",
                "resize Some(1) None",
                "reboot",
                "shutdown",
                "power_button"
            ]
        );
    }

    #[test]
    fn handle_line_reports_errors_without_calling_the_target() {
        let mut vm = FakeVm::new();
        assert_eq!(
            handle_line(b"resize cpus=0", &mut vm),
            "error cpus=0 is invalid: a VM needs at least one vCPU\n"
        );
        assert_eq!(
            handle_line(b"", &mut vm),
            "error empty request (try help)\n"
        );
        assert_eq!(
            handle_line(b"\xc3\x28", &mut vm),
            "error request is not valid UTF-8\n"
        );
        assert_eq!(
            handle(&Line::TooLong, &mut vm).line,
            "error request is longer than 4096 bytes\n"
        );
        assert_eq!(handle(&complete("ping"), &mut vm).line, "ok pong\n");
        assert!(vm.calls.is_empty());
    }

    #[test]
    fn handle_line_passes_target_errors_on() {
        let mut vm = FakeVm::new();
        vm.fail = Some("cpus=9 exceeds max_cpus=8\n(nothing was changed)".to_string());
        for line in ["resize cpus=9", "reboot", "shutdown", "powerbutton"] {
            assert_eq!(
                handle_line(line.as_bytes(), &mut vm),
                "error cpus=9 exceeds max_cpus=8 (nothing was changed)\n",
                "{line}"
            );
        }
        assert_eq!(vm.calls.len(), 4);
        assert_eq!(vm.info, FakeVm::new().info);
    }
}

//! The agent wire protocol: newline-delimited JSON objects, one per line, in
//! both directions, with a `type` tag. Byte payloads are base64 strings.
//!
//! Host -> guest: [`Request`] (every request carries an `id: u64` chosen by
//! the sender; replies carry the same id). Guest -> host: [`Message`].
//! The host mux speaks the same protocol to its local clients and answers
//! `status` itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bumped on incompatible changes; carried in [`Hello::protocol`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Name of the virtio-serial port (`-device virtserialport,name=...`).
pub const PORT_NAME: &str = "org.enilab.agent";
/// Longest line either side accepts (base64 of a 48 MiB file fits).
pub const MAX_LINE: usize = 64 << 20;
/// Largest file `read_file` returns.
pub const MAX_FILE: usize = 32 << 20;

/// A byte string, encoded as a base64 JSON string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::b64::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        crate::b64::decode(&s)
            .map(Bytes)
            .map_err(serde::de::Error::custom)
    }
}

/// Which output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Run a program. argv[0] is looked up in `PATH` (default
/// `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub id: u64,
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory, default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Written to the process's stdin, which is then closed. Without it,
    /// stdin is `/dev/null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Bytes>,
    /// The whole process group is killed with SIGKILL after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Host -> guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Replies: `output`* then `exit`, or one `error`.
    Exec(ExecRequest),
    /// Reply: `pong`.
    Ping { id: u64 },
    /// Create or truncate `path` (parent directories are created). Reply: `ok`.
    WriteFile {
        id: u64,
        path: String,
        data: Bytes,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Reply: `file`.
    ReadFile { id: u64, path: String },
    /// Kill the process group of the running exec `target` (SIGKILL, or
    /// `signal`). Reply: `ok` (the target then ends with its own `exit`).
    Cancel {
        id: u64,
        target: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// Reply: a fresh `hello` carrying this id.
    Hello { id: u64 },
    /// Answered by the host mux, never by the guest. Reply: `status`.
    Status { id: u64 },
    /// Reconcile the ENIs with instance metadata now, and every 100 ms for
    /// a few seconds (an ENI was just attached or an address moved).
    /// Reply: `ok`.
    Reconcile { id: u64 },
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Exec(e) => e.id,
            Request::Ping { id }
            | Request::WriteFile { id, .. }
            | Request::ReadFile { id, .. }
            | Request::Cancel { id, .. }
            | Request::Hello { id }
            | Request::Status { id }
            | Request::Reconcile { id } => *id,
        }
    }

    pub fn set_id(&mut self, new: u64) {
        match self {
            Request::Exec(e) => e.id = new,
            Request::Ping { id }
            | Request::WriteFile { id, .. }
            | Request::ReadFile { id, .. }
            | Request::Cancel { id, .. }
            | Request::Hello { id }
            | Request::Status { id }
            | Request::Reconcile { id } => *id = new,
        }
    }
}

/// What the guest says about itself, at start, on every (re)connection of
/// the host and on request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Set when this hello answers a `hello` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Agent version (crate version).
    pub version: String,
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    pub hostname: String,
    /// `uname -r`.
    #[serde(default)]
    pub kernel: String,
    /// Milliseconds from kernel start to agent start (CLOCK_BOOTTIME).
    pub boot_ms: u64,
    /// Milliseconds since kernel start, now.
    #[serde(default)]
    pub uptime_ms: u64,
    /// `enilab.instance=` from the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Every `enilab.KEY=VALUE` on the kernel command line, without the prefix.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Process id of the agent (changes when init restarts it).
    #[serde(default)]
    pub pid: u32,
}

/// The mux's own view, answered to `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MuxStatus {
    pub id: u64,
    /// Connected to QEMU's chardev socket.
    pub connected: bool,
    /// A hello arrived on the current connection.
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello: Option<Hello>,
    /// Milliseconds since the last heartbeat, if any arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<u64>,
    /// Local clients connected to the mux now.
    #[serde(default)]
    pub clients: u32,
}

/// Guest -> host (and mux -> client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    /// Every second while the host is connected; dropped, not queued, when
    /// the link is congested.
    Heartbeat {
        seq: u64,
        uptime_ms: u64,
    },
    /// A chunk of an exec's output, sent as soon as it is read.
    Output {
        id: u64,
        stream: Stream,
        data: Bytes,
    },
    /// The exec ended. `code` is the exit code, or 128+signal when killed.
    Exit {
        id: u64,
        code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
    },
    Pong {
        id: u64,
        uptime_ms: u64,
    },
    /// Reply to `read_file`.
    File {
        id: u64,
        data: Bytes,
    },
    /// Reply to `write_file` and `cancel`.
    Ok {
        id: u64,
    },
    /// The request failed (or a line could not be parsed: `id` is then the
    /// id found in the line, or null).
    Error {
        id: Option<u64>,
        message: String,
    },
    /// Mux-only reply to `status`.
    Status(MuxStatus),
}

impl Message {
    /// The request id this message answers, if any.
    pub fn id(&self) -> Option<u64> {
        match self {
            Message::Hello(h) => h.id,
            Message::Heartbeat { .. } => None,
            Message::Output { id, .. }
            | Message::Exit { id, .. }
            | Message::Pong { id, .. }
            | Message::File { id, .. }
            | Message::Ok { id } => Some(*id),
            Message::Error { id, .. } => *id,
            Message::Status(s) => Some(s.id),
        }
    }

    pub fn set_id(&mut self, new: u64) {
        match self {
            Message::Hello(h) => h.id = Some(new),
            Message::Heartbeat { .. } => {}
            Message::Output { id, .. }
            | Message::Exit { id, .. }
            | Message::Pong { id, .. }
            | Message::File { id, .. }
            | Message::Ok { id } => *id = new,
            Message::Error { id, .. } => *id = Some(new),
            Message::Status(s) => s.id = new,
        }
    }

    /// True if no further message for the same id follows this one.
    pub fn is_final(&self) -> bool {
        !matches!(self, Message::Output { .. } | Message::Heartbeat { .. })
    }
}

/// Serialises `v` as one protocol line, newline included.
pub fn encode_line<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these types cannot fail: no maps with non-string keys, no
    // failing Serialize impls.
    let mut out = serde_json::to_vec(v).expect("protocol types always serialise");
    out.push(b'\n');
    out
}

/// Why a line was not a valid request or message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The `id` field, if the line was a JSON object carrying one.
    pub id: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

/// Parses one line (with or without its newline) into `T`.
pub fn decode_line<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, DecodeError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| DecodeError {
        id: None,
        message: format!("malformed JSON line: {e}"),
    })?;
    let id = value.get("id").and_then(|v| v.as_u64());
    let ty = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    T::deserialize(value).map_err(|e| DecodeError {
        id,
        message: match ty {
            Some(t) => format!("invalid '{t}' message: {e}"),
            None => format!("invalid message (no 'type' field?): {e}"),
        },
    })
}

/// Splits a byte stream into lines, bounded by [`MAX_LINE`]. Overlong lines
/// are reported once and skipped up to their newline.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    discarding: bool,
}

/// One item out of a [`LineBuffer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    TooLong,
}

impl LineBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `data` and returns every line it completed.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    let (head, rest) = (&data[..nl], &data[nl + 1..]);
                    data = rest;
                    if self.discarding {
                        self.discarding = false;
                        continue;
                    }
                    if self.buf.len() + head.len() > MAX_LINE {
                        self.buf.clear();
                        out.push(Line::TooLong);
                        continue;
                    }
                    self.buf.extend_from_slice(head);
                    let line = std::mem::take(&mut self.buf);
                    if !line.iter().all(|b| b.is_ascii_whitespace()) {
                        out.push(Line::Complete(line));
                    }
                }
                None => {
                    if !self.discarding {
                        if self.buf.len() + data.len() > MAX_LINE {
                            self.buf.clear();
                            self.discarding = true;
                            out.push(Line::TooLong);
                        } else {
                            self.buf.extend_from_slice(data);
                        }
                    }
                    data = &[];
                }
            }
        }
        out
    }

    /// Forgets a partial line (after a reconnection).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt_req(r: Request) {
        let line = encode_line(&r);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Request = decode_line(&line).unwrap();
        assert_eq!(back, r);
    }

    fn rt_msg(m: Message) {
        let back: Message = decode_line(&encode_line(&m)).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn requests_roundtrip() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "b c".to_string());
        rt_req(Request::Exec(ExecRequest {
            id: 7,
            argv: vec!["sh".into(), "-c".into(), "echo \"hi\"\n".into()],
            env,
            cwd: Some("/tmp".into()),
            stdin: Some(Bytes(vec![0, 1, 2, 255, b'\n'])),
            timeout_ms: Some(1500),
        }));
        rt_req(Request::Exec(ExecRequest {
            id: 1,
            argv: vec!["true".into()],
            ..Default::default()
        }));
        rt_req(Request::Ping { id: u64::MAX });
        rt_req(Request::WriteFile {
            id: 3,
            path: "/x".into(),
            data: Bytes(b"\x00\xffdata".to_vec()),
            mode: Some(0o755),
        });
        rt_req(Request::ReadFile {
            id: 4,
            path: "/proc/cmdline".into(),
        });
        rt_req(Request::Cancel {
            id: 5,
            target: 1,
            signal: None,
        });
        rt_req(Request::Hello { id: 6 });
        rt_req(Request::Status { id: 8 });
        rt_req(Request::Reconcile { id: 9 });
    }

    #[test]
    fn messages_roundtrip() {
        rt_msg(Message::Hello(Hello {
            id: None,
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            hostname: "i-1".into(),
            kernel: "6.1.0".into(),
            boot_ms: 2900,
            uptime_ms: 3000,
            instance: Some("i-1".into()),
            params: [("instance".to_string(), "i-1".to_string())].into(),
            pid: 42,
        }));
        rt_msg(Message::Heartbeat {
            seq: 9,
            uptime_ms: 10,
        });
        rt_msg(Message::Output {
            id: 1,
            stream: Stream::Stderr,
            data: Bytes(b"oops\n".to_vec()),
        });
        rt_msg(Message::Exit {
            id: 1,
            code: 137,
            signal: Some(9),
            timed_out: true,
        });
        rt_msg(Message::Exit {
            id: 1,
            code: 0,
            signal: None,
            timed_out: false,
        });
        rt_msg(Message::Pong {
            id: 2,
            uptime_ms: 5,
        });
        rt_msg(Message::File {
            id: 3,
            data: Bytes(vec![1, 2, 3]),
        });
        rt_msg(Message::Ok { id: 4 });
        rt_msg(Message::Error {
            id: None,
            message: "bad".into(),
        });
        rt_msg(Message::Error {
            id: Some(5),
            message: "bad".into(),
        });
        rt_msg(Message::Status(MuxStatus {
            id: 6,
            connected: true,
            ready: false,
            hello: None,
            last_heartbeat_ms: Some(3),
            clients: 2,
        }));
    }

    #[test]
    fn wire_format_is_stable() {
        let line = encode_line(&Message::Output {
            id: 3,
            stream: Stream::Stdout,
            data: Bytes(b"hi".to_vec()),
        });
        assert_eq!(
            line,
            b"{\"type\":\"output\",\"id\":3,\"stream\":\"stdout\",\"data\":\"aGk=\"}\n"
        );
        let line = encode_line(&Message::Exit {
            id: 3,
            code: 0,
            signal: None,
            timed_out: false,
        });
        assert_eq!(line, b"{\"type\":\"exit\",\"id\":3,\"code\":0}\n");
        let r: Request =
            decode_line(br#"{"type":"exec","id":9,"argv":["uname","-r"],"timeout_ms":5000}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Exec(ExecRequest {
                id: 9,
                argv: vec!["uname".into(), "-r".into()],
                timeout_ms: Some(5000),
                ..Default::default()
            })
        );
        let r: Request = decode_line(b"{\"type\":\"ping\",\"id\":1,\"extra\":true}\r\n").unwrap();
        assert_eq!(r, Request::Ping { id: 1 });
    }

    #[test]
    fn malformed_lines_report_the_id_when_they_can() {
        let e = decode_line::<Request>(b"not json").unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.message.contains("malformed JSON"), "{e}");
        let e = decode_line::<Request>(br#"{"type":"launch_missiles","id":12}"#).unwrap_err();
        assert_eq!(e.id, Some(12));
        assert!(e.message.contains("launch_missiles"), "{e}");
        let e = decode_line::<Request>(br#"{"type":"exec","id":13}"#).unwrap_err();
        assert_eq!(e.id, Some(13));
        assert!(e.message.contains("argv"), "{e}");
        let e = decode_line::<Request>(br#"{"type":"write_file","id":14,"path":"/x","data":"!!"}"#)
            .unwrap_err();
        assert_eq!(e.id, Some(14));
        let e = decode_line::<Request>(br#"[1,2]"#).unwrap_err();
        assert_eq!(e.id, None);
    }

    #[test]
    fn ids_are_rewritable() {
        let mut r = Request::Exec(ExecRequest {
            id: 1,
            argv: vec!["x".into()],
            ..Default::default()
        });
        r.set_id(99);
        assert_eq!(r.id(), 99);
        let mut m = Message::Hello(Hello::default());
        assert_eq!(m.id(), None);
        m.set_id(5);
        assert_eq!(m.id(), Some(5));
        assert!(m.is_final());
        assert!(!Message::Output {
            id: 1,
            stream: Stream::Stdout,
            data: Bytes::default()
        }
        .is_final());
    }

    #[test]
    fn line_buffer_splits_and_bounds() {
        let mut lb = LineBuffer::new();
        assert_eq!(lb.push(b"ab"), vec![]);
        assert_eq!(
            lb.push(b"c\n\n  \nd"),
            vec![Line::Complete(b"abc".to_vec())]
        );
        assert_eq!(
            lb.push(b"e\nf\n"),
            vec![
                Line::Complete(b"de".to_vec()),
                Line::Complete(b"f".to_vec())
            ]
        );
        let big = vec![b'x'; MAX_LINE + 1];
        assert_eq!(lb.push(&big), vec![Line::TooLong]);
        assert_eq!(
            lb.push(b"more junk\nok\n"),
            vec![Line::Complete(b"ok".to_vec())]
        );
        lb.push(b"partial");
        lb.clear();
        assert_eq!(lb.push(b"x\n"), vec![Line::Complete(b"x".to_vec())]);
    }
}

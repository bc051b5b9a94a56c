//! A small XML writer for EC2 responses: elements, text with escaping, and
//! EC2's `<fooSet><item>..</item></fooSet>` lists.

/// EC2's XML namespace for API version 2016-11-15.
pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// Append `s` to `out` as XML character data (never used in attributes, so
/// quotes stay as they are). Characters
/// XML 1.0 cannot carry (most C0 controls, lone surrogates cannot occur in a
/// Rust `str`, U+FFFE/U+FFFF) become U+FFFD.
pub fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\t' | '\n' => out.push(c),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    escape_into(&mut o, s);
    o
}

/// Builds an XML document body. Element names are always our own literals.
#[derive(Debug, Default)]
pub struct Xml {
    buf: String,
}

impl Xml {
    pub fn new() -> Xml {
        Xml {
            buf: String::with_capacity(1024),
        }
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        self.buf.push('<');
        self.buf.push_str(name);
        self.buf.push('>');
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        self.buf.push_str("</");
        self.buf.push_str(name);
        self.buf.push('>');
        self
    }

    /// `<name>text</name>`.
    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.open(name);
        escape_into(&mut self.buf, value);
        self.close(name)
    }

    pub fn opt(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        if let Some(v) = value {
            self.text(name, v);
        }
        self
    }

    pub fn num(&mut self, name: &str, value: impl std::fmt::Display) -> &mut Self {
        self.text(name, &value.to_string())
    }

    pub fn bool(&mut self, name: &str, value: bool) -> &mut Self {
        self.text(name, if value { "true" } else { "false" })
    }

    /// `<name>` ... `</name>` around `f`.
    pub fn elem(&mut self, name: &str, f: impl FnOnce(&mut Xml)) -> &mut Self {
        self.open(name);
        f(self);
        self.close(name)
    }

    /// `<name><item>..</item>...</name>`, one item per element of `items`.
    pub fn set<T>(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut Xml, T),
    ) -> &mut Self {
        self.open(name);
        for it in items {
            self.open("item");
            f(self, it);
            self.close("item");
        }
        self.close(name)
    }

    /// `<name><item>value</item>...</name>` for plain strings.
    pub fn string_set<'a>(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = &'a str>,
    ) -> &mut Self {
        self.set(name, items, |x, s| {
            escape_into(&mut x.buf, s);
        })
    }

    /// The query protocol's lists (ELBv2): `<name><member>..</member>...</name>`.
    pub fn members<T>(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut Xml, T),
    ) -> &mut Self {
        self.open(name);
        for it in items {
            self.open("member");
            f(self, it);
            self.close("member");
        }
        self.close(name)
    }

    /// `<name><member>value</member>...</name>` for plain strings.
    pub fn member_strings<'a>(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = &'a str>,
    ) -> &mut Self {
        self.members(name, items, |x, s| {
            escape_into(&mut x.buf, s);
        })
    }

    pub fn tags(&mut self, tags: &crate::store::model::Tags) -> &mut Self {
        self.set("tagSet", tags, |x, (k, v)| {
            x.text("key", k).text("value", v);
        })
    }

    pub fn finish(self) -> String {
        self.buf
    }
}

/// The complete success document for `action`.
pub fn response(action: &str, request_id: &str, body: &str) -> String {
    let mut s = String::with_capacity(body.len() + 200);
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<");
    s.push_str(action);
    s.push_str("Response xmlns=\"");
    s.push_str(NAMESPACE);
    s.push_str("\"><requestId>");
    s.push_str(request_id);
    s.push_str("</requestId>");
    s.push_str(body);
    s.push_str("</");
    s.push_str(action);
    s.push_str("Response>");
    s
}

/// ELBv2's XML namespace (API version 2015-12-01).
pub const ELBV2_NAMESPACE: &str = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/";

/// An ELBv2 success document: `<XResponse><XResult>body</XResult>
/// <ResponseMetadata>`.
pub fn elbv2_response(action: &str, request_id: &str, body: &str) -> String {
    let mut s = String::with_capacity(body.len() + 300);
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<");
    s.push_str(action);
    s.push_str("Response xmlns=\"");
    s.push_str(ELBV2_NAMESPACE);
    s.push_str("\"><");
    s.push_str(action);
    s.push_str("Result>");
    s.push_str(body);
    s.push_str("</");
    s.push_str(action);
    s.push_str("Result><ResponseMetadata><RequestId>");
    escape_into(&mut s, request_id);
    s.push_str("</RequestId></ResponseMetadata></");
    s.push_str(action);
    s.push_str("Response>");
    s
}

/// ELBv2's error document; `sender`: the client's fault (else Receiver).
pub fn elbv2_error(code: &str, message: &str, request_id: &str, sender: bool) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ErrorResponse xmlns=\"");
    s.push_str(ELBV2_NAMESPACE);
    s.push_str("\"><Error><Type>");
    s.push_str(if sender { "Sender" } else { "Receiver" });
    s.push_str("</Type><Code>");
    escape_into(&mut s, code);
    s.push_str("</Code><Message>");
    escape_into(&mut s, message);
    s.push_str("</Message></Error><RequestId>");
    escape_into(&mut s, request_id);
    s.push_str("</RequestId></ErrorResponse>");
    s
}

/// EC2's error document.
pub fn error(code: &str, message: &str, request_id: &str) -> String {
    let mut s =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>");
    escape_into(&mut s, code);
    s.push_str("</Code><Message>");
    escape_into(&mut s, message);
    s.push_str("</Message></Error></Errors><RequestID>");
    escape_into(&mut s, request_id);
    s.push_str("</RequestID></Response>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_controls() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;\"c'");
        assert_eq!(escape("x\u{0}y\u{1b}z"), "x\u{fffd}y\u{fffd}z");
        assert_eq!(escape("tab\tnl\ncr\r"), "tab\tnl\ncr&#13;");
        assert_eq!(escape("ünïcødé ✓"), "ünïcødé ✓");
        assert_eq!(escape("]]>"), "]]&gt;");
    }

    #[test]
    fn builds_sets_and_documents() {
        let mut x = Xml::new();
        x.text("vpcId", "vpc-1")
            .string_set("ids", ["a", "<b>"])
            .set("s", [1, 2], |x, n| {
                x.num("n", n);
            })
            .bool("ok", true);
        let body = x.finish();
        assert_eq!(
            body,
            "<vpcId>vpc-1</vpcId><ids><item>a</item><item>&lt;b&gt;</item></ids>\
             <s><item><n>1</n></item><item><n>2</n></item></s><ok>true</ok>"
        );
        let doc = response("DescribeVpcs", "r-1", &body);
        assert!(doc.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeVpcsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r-1</requestId>"));
        assert!(doc.ends_with("</DescribeVpcsResponse>"));
        let e = error(
            "InvalidVpcID.NotFound",
            "The vpc ID '<x>' does not exist",
            "r-2",
        );
        assert_eq!(
            e,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InvalidVpcID.NotFound</Code>\
             <Message>The vpc ID '&lt;x&gt;' does not exist</Message></Error></Errors><RequestID>r-2</RequestID></Response>"
        );
    }
}

//! A small standard base64 codec (RFC 4648, alphabet `A-Z a-z 0-9 + /`, with
//! `=` padding). Byte payloads inside the JSON protocol use it.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes `data` as padded standard base64.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Why a base64 string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The length is not a multiple of four.
    Length(usize),
    /// A byte outside the alphabet, at this offset.
    Byte(usize),
    /// Padding somewhere other than the last one or two places.
    Padding,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Length(n) => write!(f, "base64 length {n} is not a multiple of 4"),
            DecodeError::Byte(i) => write!(f, "invalid base64 character at offset {i}"),
            DecodeError::Padding => write!(f, "misplaced base64 padding"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Decodes padded standard base64. Whitespace is not accepted.
pub fn decode(s: &str) -> Result<Vec<u8>, DecodeError> {
    let s = s.as_bytes();
    if s.len() % 4 != 0 {
        return Err(DecodeError::Length(s.len()));
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let quads = s.len() / 4;
    for (q, quad) in s.chunks(4).enumerate() {
        let last = q + 1 == quads;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(DecodeError::Padding);
        }
        let mut n = 0u32;
        for (i, &c) in quad[..4 - pad].iter().enumerate() {
            let v = value(c).ok_or(if c == b'=' {
                DecodeError::Padding
            } else {
                DecodeError::Byte(q * 4 + i)
            })?;
            n |= v << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if pad < 2 {
            out.push((n >> 8) as u8);
        }
        if pad < 1 {
            out.push(n as u8);
        }
    }
    Ok(out)
}

/// Lower-case hex, for logs and digests.
pub fn hex(data: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(data.len() * 2);
    for &b in data {
        s.push(H[usize::from(b >> 4)] as char);
        s.push(H[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        let v = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in v {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn roundtrip_all_bytes_and_lengths() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for len in 0..300 {
            let e = encode(&data[..len]);
            assert_eq!(decode(&e).unwrap(), &data[..len], "len {len}");
        }
        assert!(encode(&[0xfb, 0xff]).contains('+') || encode(&[0xfb, 0xff]).contains('/'));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode("abc"), Err(DecodeError::Length(3)));
        assert_eq!(decode("ab!d"), Err(DecodeError::Byte(2)));
        assert_eq!(decode("a==="), Err(DecodeError::Padding));
        assert_eq!(decode("Zg==Zg=="), Err(DecodeError::Padding));
        assert_eq!(decode("Z=g="), Err(DecodeError::Padding));
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}

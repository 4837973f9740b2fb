//! Subresource Integrity values (`checksum.sri`): `sha256-`, `sha384-` or
//! `sha512-` followed by the standard base64 of the hash.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::Digest as _;

/// The hash algorithms SRI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SriAlgorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl SriAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            SriAlgorithm::Sha256 => "sha256",
            SriAlgorithm::Sha384 => "sha384",
            SriAlgorithm::Sha512 => "sha512",
        }
    }

    fn hash_len(self) -> usize {
        match self {
            SriAlgorithm::Sha256 => 32,
            SriAlgorithm::Sha384 => 48,
            SriAlgorithm::Sha512 => 64,
        }
    }

    pub fn hasher(self) -> SriHasher {
        match self {
            SriAlgorithm::Sha256 => SriHasher::Sha256(sha2::Sha256::new()),
            SriAlgorithm::Sha384 => SriHasher::Sha384(sha2::Sha384::new()),
            SriAlgorithm::Sha512 => SriHasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// One parsed `checksum.sri` value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sri {
    pub algorithm: SriAlgorithm,
    pub hash: Vec<u8>,
}

impl Sri {
    /// Parses `ALGO-BASE64`. The error says what is wrong without quoting
    /// more than the algorithm.
    pub fn parse(text: &str) -> Result<Sri, String> {
        let text = text.trim();
        let (algo, b64) = text.split_once('-').ok_or("is not ALGORITHM-BASE64 (e.g. sha256-...)")?;
        let algorithm = match algo {
            "sha256" => SriAlgorithm::Sha256,
            "sha384" => SriAlgorithm::Sha384,
            "sha512" => SriAlgorithm::Sha512,
            other => {
                return Err(format!(
                    "algorithm {} is not supported (sha256, sha384, sha512)",
                    remote_apis::quote(other)
                ));
            }
        };
        let hash = STANDARD
            .decode(b64)
            .or_else(|_| STANDARD_NO_PAD.decode(b64))
            .map_err(|_| format!("the {algo} hash is not valid base64"))?;
        if hash.len() != algorithm.hash_len() {
            return Err(format!("a {algo} hash has {} bytes, not {}", algorithm.hash_len(), hash.len()));
        }
        Ok(Sri { algorithm, hash })
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(&self.hash)
    }
}

impl fmt::Display for Sri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.algorithm.name(), STANDARD.encode(&self.hash))
    }
}

/// An incremental hash for one SRI algorithm.
#[derive(Clone)]
pub enum SriHasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl SriHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            SriHasher::Sha256(h) => h.update(data),
            SriHasher::Sha384(h) => h.update(data),
            SriHasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Sri {
        let (algorithm, hash) = match self {
            SriHasher::Sha256(h) => (SriAlgorithm::Sha256, h.finalize().to_vec()),
            SriHasher::Sha384(h) => (SriAlgorithm::Sha384, h.finalize().to_vec()),
            SriHasher::Sha512(h) => (SriAlgorithm::Sha512, h.finalize().to_vec()),
        };
        Sri { algorithm, hash }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sri_of(algorithm: SriAlgorithm, data: &[u8]) -> Sri {
        let mut h = algorithm.hasher();
        h.update(data);
        h.finish()
    }

    #[test]
    fn known_values_round_trip() {
        // `printf abc | openssl dgst -sha256 -binary | base64`, and so on.
        let cases = [
            (SriAlgorithm::Sha256, "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="),
            (SriAlgorithm::Sha384, "sha384-ywB1P0WjXou1oD1pmsZQBycsMqsO3tFjGotgWkP/W+2AhgcroefMI1i67KE0yCWn"),
            (
                SriAlgorithm::Sha512,
                "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==",
            ),
        ];
        for (algorithm, text) in cases {
            let parsed = Sri::parse(text).unwrap();
            assert_eq!(parsed, sri_of(algorithm, b"abc"), "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let cases = [
            ("", "ALGORITHM-BASE64"),
            ("md5-rL0Y20zC+Fzt72VPzMSk2A==", "md5"),
            ("sha256-!!!", "base64"),
            ("sha256-YWJj", "32"),
            ("sha512-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=", "64"),
        ];
        for (text, needle) in cases {
            let e = Sri::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        // Unpadded base64 is accepted too.
        assert!(Sri::parse("sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0").is_ok());
    }
}

//! A WAL position (`pg_lsn`), typed so that a value the server sent and we could not read is
//! an error, never a silent zero.

use std::{fmt, str::FromStr};

/// A 64-bit WAL position. Its text form is PostgreSQL's `pg_lsn`: the high and low 32 bits in
/// hex, `16/B374D848`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// A string that is not a `pg_lsn`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a pg_lsn (expected two hex numbers of 1 to 8 digits, as in 16/B374D848)")]
pub struct LsnError(pub String);

impl Lsn {
    /// Bytes of WAL from `earlier` to `self`, or `None` if `earlier` is ahead.
    #[must_use]
    pub const fn checked_sub(self, earlier: Self) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// Bytes of WAL from `earlier` to `self`, 0 if `earlier` is ahead (a position read after
    /// `self` may legitimately have passed it).
    #[must_use]
    pub const fn saturating_sub(self, earlier: Self) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Self(v)
    }
}

impl FromStr for Lsn {
    type Err = LsnError;

    /// Accepts exactly what PostgreSQL's `pg_lsn_in` accepts: `X/Y`, each 1 to 8 hex digits,
    /// nothing else (no sign, no spaces).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |p: &str| -> Result<u64, LsnError> {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(p, 16).map_err(|_| err())
        };
        Ok(Self((half(hi)? << 32) | half(lo)?))
    }
}

impl fmt::Display for Lsn {
    /// PostgreSQL's own form: uppercase hex, no padding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// For a journaled `Option<Lsn>`: absent, `null` and `""` are `None` (an empty string is how
/// a position never read was once written); anything else must be a `pg_lsn`.
pub fn optional<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Lsn>, D::Error> {
    match <Option<String> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        for (text, value) in [
            ("0/0", 0),
            ("16/B374D848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
            ("1/0", 1 << 32),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn, Lsn(value), "{text}");
            assert_eq!(lsn.to_string(), text);
        }
        // Lowercase and zero-padded input are valid pg_lsn text; output is PostgreSQL's form.
        assert_eq!(
            "16/b374d848".parse::<Lsn>().unwrap().to_string(),
            "16/B374D848"
        );
        assert_eq!("0/0000ABCD".parse::<Lsn>().unwrap(), Lsn(0xABCD));
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            "",
            "nope",
            "0",
            "/",
            "0/",
            "/0",
            "16/B374D848 ",
            " 0/0",
            "+1/0",
            "1/-0",
            "1/2/3",
            "123456789/0",
            "0/123456789",
            "G/0",
            "0x1/0",
        ] {
            let e = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(e, LsnError(bad.to_owned()));
            assert!(e.to_string().contains("is not a pg_lsn"), "{e}");
        }
    }

    #[test]
    fn order_and_distance() {
        let a: Lsn = "0/FFFFFFFF".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.checked_sub(a), Some(1));
        assert_eq!(a.checked_sub(b), None);
        assert_eq!(a.saturating_sub(b), 0);
        assert_eq!(b.saturating_sub(Lsn(0)), 1 << 32);
    }

    #[test]
    fn serde_uses_the_text_form() {
        let lsn = Lsn(0x16_B374_D848);
        let json = serde_json::to_string(&lsn).unwrap();
        assert_eq!(json, "\"16/B374D848\"");
        assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
        assert!(serde_json::from_str::<Lsn>("\"zero\"").is_err());
        assert!(serde_json::from_str::<Lsn>("0").is_err());
    }

    #[test]
    fn a_journaled_position_reads_back_and_an_empty_one_is_none() {
        #[derive(serde::Deserialize)]
        struct E {
            #[serde(default, deserialize_with = "optional")]
            at: Option<Lsn>,
        }
        let read = |j: &str| serde_json::from_str::<E>(j).map(|e| e.at);
        assert_eq!(
            read(r#"{"at":"16/B374D848"}"#).unwrap(),
            Some(Lsn(0x16_B374_D848))
        );
        assert_eq!(read(r#"{"at":""}"#).unwrap(), None);
        assert_eq!(read(r#"{"at":null}"#).unwrap(), None);
        assert_eq!(read("{}").unwrap(), None);
        assert!(read(r#"{"at":"nope"}"#).is_err(), "never a silent zero");
        assert_eq!(
            serde_json::to_string(&Lsn(0x16_B374_D848)).unwrap(),
            r#""16/B374D848""#
        );
    }
}

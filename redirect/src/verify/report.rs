//! What `verify` found, as types: one verdict per table, and the keys that differ.

use serde::{Deserialize, Serialize};

/// A primary key value, one text per key column (in the key's column order).
pub type Key = Vec<String>;

/// How a table was compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Row counts and md5 hashes of key-ordered chunks, chunk by chunk.
    ChunkedByPrimaryKey,
    /// No primary key: the row count and an order-independent hash of the whole table, in
    /// one statement; a difference cannot name rows.
    WholeTable,
    /// Not compared (the table is missing on one side, or its columns differ).
    None,
}

/// How one row differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowDiff {
    /// On the source, not on the target.
    MissingOnTarget,
    /// On the target, not on the source.
    MissingOnSource,
    /// On both, with different contents.
    Changed,
}

impl std::fmt::Display for RowDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MissingOnTarget => "missing on target",
            Self::MissingOnSource => "only on target",
            Self::Changed => "changed",
        })
    }
}

/// One differing row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDiff {
    pub key: Key,
    pub diff: RowDiff,
}

/// A table's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum TableVerdict {
    /// Same rows on both servers.
    Equal,
    /// Rows differ: how many, and the first few (in key order within each chunk).
    Differs {
        differing_rows: u64,
        first_keys: Vec<KeyDiff>,
    },
    /// The table is on the source only: it was never replicated.
    MissingOnTarget,
    /// The table is on the target only.
    MissingOnSource,
    /// The column lists (names and types, in order) differ, so rows were not compared.
    SchemaDiffers { detail: String },
    /// Some rows kept changing under live writes on every re-read, so they could not be
    /// compared at a consistent point (none was found to differ); run verify again.
    Unsettled { keys: Vec<Key> },
    /// The comparison failed (a query error); the other tables were still compared.
    Failed { error: String },
}

impl TableVerdict {
    #[must_use]
    pub fn is_equal(&self) -> bool {
        matches!(self, Self::Equal)
    }

    /// A short word for the human table.
    #[must_use]
    pub fn word(&self) -> &'static str {
        match self {
            Self::Equal => "equal",
            Self::Differs { .. } => "DIFFERS",
            Self::MissingOnTarget => "MISSING ON TARGET",
            Self::MissingOnSource => "ONLY ON TARGET",
            Self::SchemaDiffers { .. } => "SCHEMA DIFFERS",
            Self::Unsettled { .. } => "UNSETTLED",
            Self::Failed { .. } => "FAILED",
        }
    }
}

/// One table's comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableReport {
    /// The database the table is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// `schema.table`, quoted as SQL would need it.
    pub table: String,
    /// The primary key's columns (empty without one).
    pub key_columns: Vec<String>,
    pub method: Method,
    /// Rows counted on each side (at each chunk's consistent point).
    pub source_rows: Option<u64>,
    pub target_rows: Option<u64>,
    pub chunks: u64,
    #[serde(flatten)]
    pub verdict: TableVerdict,
}

/// The whole comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub equal: usize,
    pub differ: usize,
    /// How each chunk was read consistently (or why it could not be).
    pub consistency: String,
    pub chunk_rows: u64,
    pub rate: Option<u64>,
    pub elapsed_ms: f64,
}

impl Report {
    #[must_use]
    pub fn new(
        tables: Vec<TableReport>,
        consistency: String,
        chunk_rows: u64,
        rate: Option<u64>,
        elapsed_ms: f64,
    ) -> Self {
        let equal = tables.iter().filter(|t| t.verdict.is_equal()).count();
        Self {
            differ: tables.len() - equal,
            equal,
            tables,
            consistency,
            chunk_rows,
            rate,
            elapsed_ms,
        }
    }

    /// The last line of the human output.
    #[must_use]
    pub fn summary(&self) -> String {
        format!(
            "verify: {} tables equal, {} differ",
            self.equal, self.differ
        )
    }
}

/// `(a, b) = (1, x)` or `id = 42`: a key for people.
#[must_use]
pub fn show_key(columns: &[String], key: &[String]) -> String {
    if let ([c], [k]) = (columns, key) {
        return format!("{c}={k}");
    }
    format!("({})=({})", columns.join(", "), key.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_serialize_flat_and_round_trip() {
        let t = TableReport {
            database: None,
            table: "public.t".into(),
            key_columns: vec!["a".into(), "b".into()],
            method: Method::ChunkedByPrimaryKey,
            source_rows: Some(3),
            target_rows: Some(2),
            chunks: 1,
            verdict: TableVerdict::Differs {
                differing_rows: 1,
                first_keys: vec![KeyDiff {
                    key: vec!["1".into(), "x".into()],
                    diff: RowDiff::MissingOnTarget,
                }],
            },
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["verdict"], "differs");
        assert_eq!(v["first_keys"][0]["key"][1], "x");
        assert_eq!(v["first_keys"][0]["diff"], "missing_on_target");
        assert_eq!(serde_json::from_value::<TableReport>(v).unwrap(), t);
        let r = Report::new(vec![t], String::new(), 10, None, 0.0);
        assert_eq!(r.summary(), "verify: 0 tables equal, 1 differ");
        assert_eq!(
            show_key(&["a".into(), "b".into()], &["1".into(), "x".into()]),
            "(a, b)=(1, x)"
        );
        assert_eq!(show_key(&["id".into()], &["7".into()]), "id=7");
    }
}

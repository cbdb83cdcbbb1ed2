//! The SQL that reads one chunk of a table on one server: an aggregate (row count, md5 of the
//! key-ordered row hashes, a version hash of the rows' `xmin`, and the chunk's last key), or
//! the rows themselves (key, row hash, `xmin`) when a chunk differs and its keys are wanted.
//!
//! A chunk is a key range `(lo, hi]` in primary-key order (row comparison, so composite keys
//! work); key values travel as text and are cast back to the key columns' types on the server.

use std::{collections::HashMap, time::Duration};

use tokio_postgres::{Client, types::ToSql};

use super::{report::Key, tables::Table};
use crate::pg::{PgError, Server, quote::quote_ident, timed};

/// The alias of the table's rows in every statement (a name no one gives a column).
const ROW: &str = "redirect_verify_row";

/// A chunk's summary on one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub rows: u64,
    /// md5 over the md5 of every row's text, in key order: equal rows, equal hash.
    pub hash: String,
    /// md5 over every row's `xmin`: changes whenever a row in the range is written, so a
    /// re-read tells whether the range stayed still (never compared across servers).
    pub version: String,
    /// The chunk's last key (`None` for an empty chunk).
    pub last: Option<Key>,
}

/// One row of a chunk: its row hash and `xmin` (its version on this server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowVersion {
    pub hash: String,
    pub xmin: String,
}

/// A chunk's rows, in key order, and by key.
#[derive(Debug, Default)]
pub struct Rows {
    pub order: Vec<Key>,
    pub by_key: HashMap<Key, RowVersion>,
}

/// The statements for one table with a primary key.
pub struct ChunkSql {
    table: String,
    /// `(quoted name, type)` of each key column.
    key: Vec<(String, String)>,
}

impl ChunkSql {
    #[must_use]
    pub fn new(t: &Table) -> Self {
        Self {
            table: t.sql_name(),
            key: t
                .key
                .iter()
                .map(|(n, ty)| (quote_ident(n), ty.clone()))
                .collect(),
        }
    }

    fn key_columns(&self, prefix: &str) -> String {
        self.key
            .iter()
            .map(|(n, _)| format!("{prefix}{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `($1::text)::integer, ($2::text)::text`, numbered from `first`.
    fn key_params(&self, first: usize) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("(${}::text)::{ty}", first + i))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The `WHERE` clause for `(lo, hi]` and its parameters.
    fn range(&self, lo: Option<&Key>, hi: Option<&Key>) -> (String, Vec<String>) {
        let cols = format!("({})", self.key_columns(&format!("{ROW}.")));
        let mut clauses = Vec::new();
        let mut params = Vec::new();
        if let Some(lo) = lo {
            clauses.push(format!("{cols} > ({})", self.key_params(1)));
            params.extend(lo.iter().cloned());
        }
        if let Some(hi) = hi {
            clauses.push(format!("{cols} <= ({})", self.key_params(params.len() + 1)));
            params.extend(hi.iter().cloned());
        }
        let clause = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        (clause, params)
    }

    /// Keys as a JSON array of texts: unambiguous whatever the values hold.
    fn key_json(&self) -> String {
        format!(
            "to_json(ARRAY[{}])::text",
            self.key
                .iter()
                .map(|(n, _)| format!("{ROW}.{n}::text"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// The aggregate of `(lo, hi]`, at most `limit` rows from `lo` in key order.
    #[must_use]
    pub fn aggregate(
        &self,
        lo: Option<&Key>,
        hi: Option<&Key>,
        limit: Option<u64>,
    ) -> (String, Vec<String>) {
        let (clause, params) = self.range(lo, hi);
        let inner_keys: String = (0..self.key.len())
            .map(|i| format!("c.k{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let inner_keys_desc: String = (0..self.key.len())
            .map(|i| format!("c.k{i} DESC"))
            .collect::<Vec<_>>()
            .join(", ");
        let key_aliases: String = self
            .key
            .iter()
            .enumerate()
            .map(|(i, (n, _))| format!("{ROW}.{n} AS k{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let limit = limit.map_or_else(String::new, |n| format!(" LIMIT {n}"));
        let sql = format!(
            "SELECT count(*)::int8, \
                    coalesce(md5(string_agg(c.h, '' ORDER BY {inner_keys})), ''), \
                    coalesce(md5(string_agg(c.v, ',' ORDER BY {inner_keys})), ''), \
                    (array_agg(c.kj ORDER BY {inner_keys_desc}))[1] \
             FROM (SELECT md5(convert_to(ROW({ROW}.*)::text, 'UTF8')) AS h, {ROW}.xmin::text AS v, {} AS kj, {key_aliases} \
                   FROM {} {ROW}{clause} ORDER BY {}{limit}) c",
            self.key_json(),
            self.table,
            self.key_columns(&format!("{ROW}.")),
        );
        (sql, params)
    }

    /// The table's last key.
    #[must_use]
    pub fn last_key(&self) -> String {
        format!(
            "SELECT {} FROM {} {ROW} ORDER BY {} LIMIT 1",
            self.key_json(),
            self.table,
            self.key
                .iter()
                .map(|(n, _)| format!("{ROW}.{n} DESC"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Whether key `$1..` sorts after key `$k+1..` (the server orders keys, as its index does).
    #[must_use]
    pub fn after(&self) -> String {
        format!(
            "SELECT ({}) > ({})",
            self.key_params(1),
            self.key_params(self.key.len() + 1)
        )
    }

    /// Every row of `(lo, hi]`: key, row hash, `xmin`.
    #[must_use]
    pub fn rows(&self, lo: Option<&Key>, hi: Option<&Key>) -> (String, Vec<String>) {
        let (clause, params) = self.range(lo, hi);
        let sql = format!(
            "SELECT {}, md5(convert_to(ROW({ROW}.*)::text, 'UTF8')), {ROW}.xmin::text FROM {} {ROW}{clause} ORDER BY {}",
            self.key_json(),
            self.table,
            self.key_columns(&format!("{ROW}.")),
        );
        (sql, params)
    }
}

/// A table without a primary key, as one order-independent aggregate: the row count, sums of
/// two 60-bit slices of every row's md5 (duplicates count), and the sum of `xmin`s.
#[must_use]
pub fn whole_table(t: &Table) -> String {
    format!(
        "SELECT count(*)::int8, \
                coalesce(sum(('x' || substr(md5(convert_to(ROW({ROW}.*)::text, 'UTF8')), 1, 15))::bit(60)::int8)::text || '/' || \
                         sum(('x' || substr(md5(convert_to(ROW({ROW}.*)::text, 'UTF8')), 16, 15))::bit(60)::int8)::text, ''), \
                coalesce(sum({ROW}.xmin::text::int8)::text, ''), NULL::text \
         FROM {} {ROW}",
        t.sql_name()
    )
}

fn params(p: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter().map(|s| s as &(dyn ToSql + Sync)).collect()
}

/// Runs an aggregate statement (from [`ChunkSql::aggregate`] or [`whole_table`]).
pub async fn read_aggregate(
    which: impl Into<Server>,
    db: &Client,
    (sql, args): &(String, Vec<String>),
    timeout: Duration,
) -> Result<Aggregate, PgError> {
    let which: Server = which.into();
    let row = timed(
        which,
        "hashing a chunk",
        timeout,
        db.query_one(sql.as_str(), &params(args)),
    )
    .await?;
    let last: Option<String> = row.get(3);
    Ok(Aggregate {
        rows: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        hash: row.get(1),
        version: row.get(2),
        last: last.map(|j| parse_key(&j)),
    })
}

/// The table's last key on one server (`None`: empty).
pub async fn read_last_key(
    which: impl Into<Server>,
    db: &Client,
    sql: &ChunkSql,
    timeout: Duration,
) -> Result<Option<Key>, PgError> {
    let which: Server = which.into();
    let row = timed(
        which,
        "reading the table's last key",
        timeout,
        db.query_opt(sql.last_key().as_str(), &[]),
    )
    .await?;
    Ok(row.map(|r| parse_key(&r.get::<_, String>(0))))
}

/// Whether key `a` sorts after key `b`, asked of one server.
pub async fn key_after(
    which: impl Into<Server>,
    db: &Client,
    sql: &ChunkSql,
    a: &Key,
    b: &Key,
    timeout: Duration,
) -> Result<bool, PgError> {
    let which: Server = which.into();
    let args: Vec<String> = a.iter().chain(b).cloned().collect();
    let row = timed(
        which,
        "ordering two keys",
        timeout,
        db.query_one(sql.after().as_str(), &params(&args)),
    )
    .await?;
    Ok(row.get(0))
}

/// Runs a rows statement (from [`ChunkSql::rows`]).
pub async fn read_rows(
    which: impl Into<Server>,
    db: &Client,
    (sql, args): &(String, Vec<String>),
    timeout: Duration,
) -> Result<Rows, PgError> {
    let which: Server = which.into();
    let rows = timed(
        which,
        "reading a chunk's row hashes",
        timeout,
        db.query(sql.as_str(), &params(args)),
    )
    .await?;
    let mut out = Rows::default();
    for r in rows {
        let key = parse_key(&r.get::<_, String>(0));
        out.order.push(key.clone());
        out.by_key.insert(
            key,
            RowVersion {
                hash: r.get(1),
                xmin: r.get(2),
            },
        );
    }
    Ok(out)
}

/// A key from the JSON array of texts the statements return.
fn parse_key(json: &str) -> Key {
    serde_json::from_str(json).unwrap_or_else(|_| vec![json.to_owned()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_ranges_compare_rows_and_cast_text_params() {
        let t = Table {
            schema: "s".into(),
            name: "t".into(),
            columns: vec![],
            key: vec![("a".into(), "integer".into()), ("b".into(), "text".into())],
            estimated_rows: 0,
        };
        let sql = ChunkSql::new(&t);
        let lo = vec!["1".to_owned(), "x".to_owned()];
        let hi = vec!["2".to_owned(), "y".to_owned()];
        let (s, p) = sql.rows(Some(&lo), Some(&hi));
        assert!(
            s.contains(r#"("redirect_verify_row"."a", "redirect_verify_row"."b") > (($1::text)::integer, ($2::text)::text)"#)
                || s.contains(r#"(redirect_verify_row."a", redirect_verify_row."b") > (($1::text)::integer, ($2::text)::text)"#),
            "{s}"
        );
        assert!(
            s.contains("<= (($3::text)::integer, ($4::text)::text)"),
            "{s}"
        );
        assert_eq!(p, ["1", "x", "2", "y"]);
        let (s, p) = sql.aggregate(None, None, Some(10));
        assert!(!s.contains("WHERE") && s.contains("LIMIT 10"), "{s}");
        assert!(p.is_empty());
        assert_eq!(parse_key(r#"["1","a,b"]"#), ["1", "a,b"]);
        assert_eq!(
            sql.after(),
            "SELECT (($1::text)::integer, ($2::text)::text) > (($3::text)::integer, ($4::text)::text)"
        );
        assert!(
            sql.last_key().ends_with(
                r#"ORDER BY redirect_verify_row."a" DESC, redirect_verify_row."b" DESC LIMIT 1"#
            ),
            "{}",
            sql.last_key()
        );
    }
}

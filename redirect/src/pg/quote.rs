//! SQL quoting for the few statements that cannot take parameters (DDL).

/// `'text'` with quotes doubled: a SQL string literal.
#[must_use]
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `"name"` with quotes doubled: a SQL identifier.
#[must_use]
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

//! A table's shape as a site's binlog knew it after a DDL: what an agent sends (`op:"s"`), the
//! transform passes on (`HqEvent::Schema`) and the sinks evolve their schema by.
//!
//! [`TableShape::evolve`] says what a sink holding `have` must do to take rows of `want`:
//! additive changes (a new column, a wider type) are statements it can run; anything else (a
//! dropped or renamed column, a narrower or different type) is refused with what it was, for a
//! person to decide (docs/OPERATIONS.md, "OpenMRS upgrades").

use serde::{Deserialize, Serialize};

use crate::model::{parse_enum, TableModel};

/// One column: name and `information_schema.columns.column_type` (`varchar(50)`, `int(11)`…).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnShape {
    pub name: String,
    #[serde(rename = "type")]
    pub column_type: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_null: bool,
    /// The column's default as its server wrote it (see [`crate::model::ColumnInfo::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl ColumnShape {
    /// The default as an SQL expression: MariaDB writes it as one already; MySQL writes a bare
    /// value (`in_person`), quoted here. Functions and numbers stay as they are.
    pub fn default_sql(&self) -> Option<String> {
        let d = self.default.as_deref()?.trim();
        let upper = d.to_ascii_uppercase();
        if d.starts_with('\'') || d.contains('(') || upper.starts_with("CURRENT_TIMESTAMP") || upper == "NULL" || d.parse::<f64>().is_ok() {
            Some(d.to_string())
        } else {
            Some(format!("'{}'", d.replace('\\', "\\\\").replace('\'', "''")))
        }
    }
}

/// A foreign key of one column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FkShape {
    pub column: String,
    pub ref_table: String,
    pub ref_column: String,
}

/// A secondary index of a site's table (from `information_schema.statistics`): its columns in
/// order, each with its prefix length when the index holds only the first characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexShape {
    pub name: String,
    /// `column` or `column(prefix)`, in the index's order.
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unique: bool,
}

impl IndexShape {
    /// The index's columns as an SQL list: `` `a`, `b`(20) ``.
    pub fn column_sql(&self) -> String {
        self.columns
            .iter()
            .map(|c| match c.split_once('(') {
                Some((name, prefix)) => format!("`{}`({prefix}", name.replace('`', "``")),
                None => format!("`{}`", c.replace('`', "``")),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The site's indexes a sink holding `have` lacks: an index is matched by its columns (an index
/// of the same columns under another name already serves the same queries), never dropped.
pub fn missing_indexes<'a>(want: &'a [IndexShape], have: &[IndexShape]) -> Vec<&'a IndexShape> {
    let key = |i: &IndexShape| i.columns.iter().map(|c| c.to_ascii_lowercase()).collect::<Vec<_>>();
    let mut out: Vec<&IndexShape> = Vec::new();
    for w in want {
        if !have.iter().any(|h| key(h) == key(w)) && !out.iter().any(|o| key(o) == key(w)) {
            out.push(w);
        }
    }
    out
}

/// A table as a site has it after a DDL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableShape {
    pub table: String,
    /// In ordinal order.
    pub columns: Vec<ColumnShape>,
    #[serde(default)]
    pub pk: Vec<String>,
    #[serde(default)]
    pub fks: Vec<FkShape>,
    /// Its secondary indexes when the agent read them (a DDL's shape; empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indexes: Vec<IndexShape>,
    /// Dropped (or renamed away) by `ddl`.
    #[serde(default)]
    pub dropped: bool,
    /// The statement that made it (none for a snapshot's base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddl: Option<String>,
    /// The table whose primary key this table's primary key also is (patient → person).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_parent: Option<String>,
    /// The table as it is at a fresh snapshot, sent ahead of its rows: a statement of the
    /// site's shape, not a change. The lake builds its schema from these; HQ, whose schema is
    /// the programme's OpenMRS (`sink hq-mysql --init`), does not evolve on them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base: bool,
}

/// One additive step a sink takes to hold rows of the new shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The table is new: create it.
    Create,
    /// A new column, placed after `after` (None: first).
    AddColumn { column: ColumnShape, after: Option<String> },
    /// A column's type widens (`varchar(50)` → `varchar(80)`, `int` → `bigint`).
    Widen { column: ColumnShape, from: String },
}

impl TableShape {
    pub fn of(t: &TableModel, ddl: Option<&str>) -> Self {
        TableShape {
            table: t.name.clone(),
            columns: t.columns.iter().map(|c| ColumnShape { name: c.name.clone(), column_type: c.column_type.clone(), not_null: c.not_null, default: c.default.clone() }).collect(),
            pk: t.pk.clone(),
            fks: t.fks.iter().map(|f| FkShape { column: f.column.clone(), ref_table: f.ref_table.clone(), ref_column: f.ref_column.clone() }).collect(),
            indexes: Vec::new(),
            dropped: false,
            ddl: ddl.map(|d| d.chars().take(2000).collect()),
            shared_parent: t.shared_parent.clone(),
            base: false,
        }
    }

    /// The table's shape at a fresh snapshot (see [`TableShape::base`]).
    pub fn base_of(t: &TableModel) -> Self {
        TableShape { base: true, ..TableShape::of(t, None) }
    }

    /// The steps that let a sink holding `have` (None: no such table) take this shape's rows;
    /// Err: a change that is not additive, described.
    pub fn evolve(&self, have: Option<&TableModel>) -> Result<Vec<Step>, String> {
        let Some(have) = have else {
            return Ok(if self.dropped { Vec::new() } else { vec![Step::Create] });
        };
        if self.dropped {
            return Err(format!("table `{}` was dropped or renamed at the site", self.table));
        }
        let mut steps = Vec::new();
        let mut problems = Vec::new();
        let mut prev: Option<String> = None;
        for c in &self.columns {
            match have.columns.iter().find(|h| h.name.eq_ignore_ascii_case(&c.name)) {
                None => steps.push(Step::AddColumn { column: c.clone(), after: prev.clone() }),
                Some(h) if same_type(&h.column_type, &c.column_type) => {}
                Some(h) => match widens(&h.column_type, &c.column_type) {
                    Some(true) => steps.push(Step::Widen { column: c.clone(), from: h.column_type.clone() }),
                    // Narrower at the site: the sink's wider column holds its values.
                    Some(false) => {}
                    None => problems.push(format!("column `{}` changed type from {} to {}", c.name, h.column_type, c.column_type)),
                },
            }
            prev = Some(c.name.clone());
        }
        for h in &have.columns {
            if !self.columns.iter().any(|c| c.name.eq_ignore_ascii_case(&h.name)) {
                problems.push(format!("column `{}` is gone at the site (dropped or renamed)", h.name));
            }
        }
        if problems.is_empty() {
            Ok(steps)
        } else {
            Err(format!("table `{}`: {}", self.table, problems.join("; ")))
        }
    }
}

fn norm(t: &str) -> String {
    let t = t.to_ascii_lowercase().replace(' ', "");
    // Display widths of integer types do not change what they hold.
    match t.split_once('(') {
        Some((base, rest)) if is_int(base) => format!("{base}{}", rest.split_once(')').map(|(_, tail)| tail).unwrap_or("")),
        _ => t,
    }
}

fn is_int(base: &str) -> bool {
    matches!(base, "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint")
}

fn same_type(a: &str, b: &str) -> bool {
    norm(a) == norm(b) || (norm(a).replace("integer", "int") == norm(b).replace("integer", "int"))
}

/// Some(true): `to` holds every value of `from` and more; Some(false): the reverse (narrower);
/// None: neither (a different kind of type).
pub fn widens(from: &str, to: &str) -> Option<bool> {
    let (f, t) = (norm(from), norm(to));
    let parts = |s: &str| -> (String, Option<u64>, String) {
        match s.split_once('(') {
            Some((base, rest)) => {
                let (n, tail) = rest.split_once(')').unwrap_or((rest, ""));
                (base.to_string(), n.parse().ok(), tail.to_string())
            }
            None => (s.to_string(), None, String::new()),
        }
    };
    let (fb, fnum, ftail) = parts(&f);
    let (tb, tnum, ttail) = parts(&t);
    if ftail != ttail {
        return None; // signedness or charset differ
    }
    let rank = |b: &str, family: &[&str]| family.iter().position(|x| *x == b);
    const INTS: [&str; 5] = ["tinyint", "smallint", "mediumint", "int", "bigint"];
    const TEXTS: [&str; 4] = ["tinytext", "text", "mediumtext", "longtext"];
    const BLOBS: [&str; 4] = ["tinyblob", "blob", "mediumblob", "longblob"];
    for family in [&INTS[..], &TEXTS[..], &BLOBS[..]] {
        if let (Some(a), Some(b)) = (rank(&fb, family), rank(&tb, family)) {
            return Some(b >= a);
        }
    }
    if fb == tb && matches!(fb.as_str(), "varchar" | "char" | "varbinary" | "binary") {
        return Some(tnum >= fnum);
    }
    // varchar → text is wider.
    if fb == "varchar" && rank(&tb, &TEXTS).is_some_and(|r| r >= 1) {
        return Some(true);
    }
    // A decimal holds another when it has as many digits before the point and after it.
    if matches!(fb.as_str(), "decimal" | "numeric") && matches!(tb.as_str(), "decimal" | "numeric") {
        let digits = |s: &str| -> Option<(u64, u64)> {
            let inner = s.split_once('(')?.1.split_once(')')?.0;
            let (p, sc) = inner.split_once(',').unwrap_or((inner, "0"));
            Some((p.trim().parse().ok()?, sc.trim().parse().ok()?))
        };
        let ((fp, fs), (tp, ts)) = (digits(&f).unwrap_or((10, 0)), digits(&t).unwrap_or((10, 0)));
        let (fi, ti) = (fp.saturating_sub(fs), tp.saturating_sub(ts));
        return match (ti >= fi && ts >= fs, fi >= ti && fs >= ts) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
    }
    if fb == "float" && tb == "double" {
        return Some(true);
    }
    if fb == "double" && tb == "float" {
        return Some(false);
    }
    if fb == "enum" && tb == "enum" {
        let (a, b) = (parse_enum(from).unwrap_or_default(), parse_enum(&to.replace("', '", "','")).unwrap_or_default());
        return match (b.starts_with(&a), a.starts_with(&b)) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ColumnInfo;

    fn model(cols: &[(&str, &str)]) -> TableModel {
        TableModel {
            name: "person_name".into(),
            columns: cols.iter().map(|(n, t)| ColumnInfo { name: n.to_string(), column_type: t.to_string(), ..Default::default() }).collect(),
            pk: vec!["person_name_id".into()],
            has_uuid: false,
            fks: vec![],
            shared_parent: None,
            enums: Default::default(),
        }
    }

    fn shape(cols: &[(&str, &str)]) -> TableShape {
        TableShape::of(&model(cols), Some("ALTER …"))
    }

    #[test]
    fn additive_changes_are_steps_and_the_rest_is_refused_with_what_it_was() {
        let hq = model(&[("person_name_id", "int(11)"), ("given_name", "varchar(50)"), ("family_name", "varchar(50)")]);
        let s = shape(&[("person_name_id", "int"), ("given_name", "varchar(80)"), ("nickname", "varchar(50)"), ("family_name", "varchar(50)")]);
        assert_eq!(
            s.evolve(Some(&hq)).unwrap(),
            vec![
                Step::Widen { column: ColumnShape { name: "given_name".into(), column_type: "varchar(80)".into(), ..Default::default() }, from: "varchar(50)".into() },
                Step::AddColumn { column: ColumnShape { name: "nickname".into(), column_type: "varchar(50)".into(), ..Default::default() }, after: Some("given_name".into()) },
            ]
        );
        // Narrower at the site: HQ keeps its wider column, nothing to do.
        assert_eq!(shape(&[("person_name_id", "int(11)"), ("given_name", "varchar(20)"), ("family_name", "varchar(50)")]).evolve(Some(&hq)).unwrap(), vec![]);
        assert_eq!(shape(&[("person_name_id", "bigint(20)"), ("given_name", "text"), ("family_name", "varchar(50)")]).evolve(Some(&hq)).unwrap().len(), 2);
        let dropped = shape(&[("person_name_id", "int(11)"), ("given_name", "varchar(50)")]).evolve(Some(&hq)).unwrap_err();
        assert!(dropped.contains("`family_name` is gone"), "{dropped}");
        let retyped = shape(&[("person_name_id", "int(11)"), ("given_name", "datetime"), ("family_name", "varchar(50)")]).evolve(Some(&hq)).unwrap_err();
        assert!(retyped.contains("from varchar(50) to datetime"), "{retyped}");
        assert_eq!(shape(&[("a", "int")]).evolve(None).unwrap(), vec![Step::Create]);
        assert_eq!(widens("enum('a','b')", "enum('a','b','c')"), Some(true));
        assert_eq!(widens("int(11) unsigned", "int(11)"), None);
        assert_eq!(widens("decimal(10,2)", "decimal(12,2)"), Some(true));
        assert_eq!(widens("decimal(10,2)", "decimal(12,4)"), Some(true), "as many digits before the point, more after");
        assert_eq!(widens("decimal(10,2)", "decimal(10,4)"), None, "fewer digits before the point, more after");
        assert_eq!(widens("decimal(12,4)", "decimal(10,2)"), Some(false));
        assert_eq!(widens("float", "double"), Some(true));
        assert_eq!(widens("double", "datetime"), None);
        let d = |v: &str| ColumnShape { default: Some(v.into()), ..Default::default() }.default_sql();
        assert_eq!(d("'in_person'").as_deref(), Some("'in_person'"), "MariaDB writes SQL");
        assert_eq!(d("in_person").as_deref(), Some("'in_person'"), "MySQL writes the bare value");
        assert_eq!(d("it's").as_deref(), Some("'it''s'"));
        assert_eq!(d("0").as_deref(), Some("0"));
        assert_eq!(d("current_timestamp()").as_deref(), Some("current_timestamp()"));
        assert_eq!(d("CURRENT_TIMESTAMP").as_deref(), Some("CURRENT_TIMESTAMP"));
    }

    #[test]
    fn a_sites_index_is_missing_when_no_index_has_its_columns() {
        let i = |name: &str, cols: &[&str]| IndexShape { name: name.into(), columns: cols.iter().map(|c| c.to_string()).collect(), unique: false };
        let have = [i("person_name_given", &["given_name"]), i("fam", &["family_name", "given_name"])];
        let want = [
            i("given_name_idx", &["Given_Name"]),
            i("fam_middle", &["family_name", "middle_name"]),
            i("fam_middle_again", &["family_name", "middle_name"]),
            i("prefix", &["family_name(10)"]),
        ];
        let missing: Vec<&str> = missing_indexes(&want, &have).iter().map(|m| m.name.as_str()).collect();
        assert_eq!(missing, ["fam_middle", "prefix"], "same columns under another name serve; a repeat is made once");
        assert_eq!(want[3].column_sql(), "`family_name`(10)");
        assert_eq!(want[1].column_sql(), "`family_name`, `middle_name`");
    }
}

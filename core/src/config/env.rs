//! `${VAR}`, `${VAR:-default}` and `$${` (a literal `${`) in the string values of a config
//! file, replaced from the environment before the file is typed.

use std::path::Path;

use crate::error::{CoreError, Result};

pub(super) fn substitute_env(value: &mut toml::Value, path: &mut String, file: &Path) -> Result<()> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = expand(s).map_err(|var| CoreError::Config {
                file: file.to_path_buf(),
                key: path.clone(),
                message: format!("environment variable `{var}` is not set (and `${{{var}:-default}}` gives no default)"),
            })?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute_env(item, path, file)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                substitute_env(v, path, file)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${NAME}` and `${NAME:-default}`; `$${` is a literal `${`. Err(name) if unset.
fn expand(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                out.push_str(after);
                rest = "";
                break;
            };
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match (std::env::var(name), default) {
                (Ok(v), _) => out.push_str(&v),
                (Err(_), Some(d)) => out.push_str(d),
                (Err(_), None) => return Err(name.to_string()),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_forms() {
        std::env::set_var("OMRS_TEST_EXPAND", "s3cret");
        assert_eq!(expand("a${OMRS_TEST_EXPAND}b").unwrap(), "as3cretb");
        assert_eq!(expand("${OMRS_TEST_UNSET_X:-dflt}").unwrap(), "dflt");
        assert_eq!(expand("$${literal}").unwrap(), "${literal}");
        assert_eq!(expand("cost $5").unwrap(), "cost $5");
        assert_eq!(expand("${OMRS_TEST_UNSET_Y}").unwrap_err(), "OMRS_TEST_UNSET_Y");
    }
}

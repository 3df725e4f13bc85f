//! `[[identity.identifiers]]`: the identifier types that identify one person across sites, and their normalisation.

use super::*;

/// Identifier types that identify one person across sites (DESIGN.md semantics 5).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub identifiers: Vec<IdentifierRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierRule {
    /// `patient_identifier_type.uuid`.
    pub identifier_type_uuid: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Applied in order to each identifier value before comparison.
    #[serde(default = "default_normalize")]
    pub normalize: Vec<Normalize>,
}

fn default_normalize() -> Vec<Normalize> {
    vec![Normalize::Fold, Normalize::Trim, Normalize::StripSeparators, Normalize::Upper]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Strip leading and trailing whitespace.
    Trim,
    /// Upper-case.
    Upper,
    /// Lower-case.
    Lower,
    /// Remove whitespace (any Unicode space, no-break spaces included), invisible characters
    /// (zero-width spaces and joiners, the byte-order mark, soft hyphens), `-` and the Unicode
    /// dashes and minus, `_`, `.`, `/`.
    StripSeparators,
    /// Fold what copy-paste brings into plain ASCII: full-width letters, digits and signs
    /// (`ＮＩＤ１２３` → `NID123`), Unicode dashes and minus signs (U+2010–U+2015, U+2212,
    /// U+FE58, U+FE63) → `-`, the ideographic space → ` `; invisible characters dropped.
    Fold,
}

/// Invisible characters a copy-paste leaves in a value: zero-width space, non-joiner, joiner,
/// word joiner, byte-order mark, soft hyphen.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}')
}

fn is_dash(c: char) -> bool {
    matches!(c, '-' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}')
}

/// See [`Normalize::Fold`].
fn fold(c: char) -> Option<char> {
    match c {
        c if is_invisible(c) => None,
        c if is_dash(c) => Some('-'),
        '\u{3000}' => Some(' '),
        // Full-width forms of ASCII 0x21..=0x7E.
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0),
        c => Some(c),
    }
}

impl IdentifierRule {
    pub fn normalize(&self, value: &str) -> String {
        let mut s = value.to_string();
        for step in &self.normalize {
            s = match step {
                Normalize::Trim => s.trim().to_string(),
                Normalize::Upper => s.to_uppercase(),
                Normalize::Lower => s.to_lowercase(),
                Normalize::StripSeparators => s
                    .chars()
                    .filter(|c| !c.is_whitespace() && !is_invisible(*c) && !is_dash(*c) && !matches!(c, '_' | '.' | '/'))
                    .collect(),
                Normalize::Fold => s.chars().filter_map(fold).collect(),
            };
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_undoes_formatting_noise() {
        let rule = IdentifierRule {
            identifier_type_uuid: "a".into(),
            name: None,
            normalize: default_normalize(),
        };
        assert_eq!(rule.normalize(" nid-1234 56 "), "NID123456");
        assert_eq!(rule.normalize("NID.1234/56"), "NID123456");
        // What clerks paste: Unicode dashes and minus, full-width forms, no-break and
        // zero-width spaces, a byte-order mark.
        for raw in [
            "NID\u{2010}123456",
            "NID\u{2013}1234\u{2014}56",
            "NID\u{2212}123456",
            "ＮＩＤ１２３４５６",
            "ｎｉｄ－１２３４５６",
            "\u{00A0}NID\u{00A0}123456\u{202F}",
            "NID\u{200B}123\u{200D}456\u{FEFF}",
            "\u{3000}nid 123456\u{3000}",
        ] {
            assert_eq!(rule.normalize(raw), "NID123456", "{raw:?}");
        }
        // A value that differs in one character stays different.
        assert_ne!(rule.normalize("NID-123457"), rule.normalize("NID-123456"));
        // Without `fold`, separators still go, full-width digits stay.
        let plain = IdentifierRule { normalize: vec![Normalize::Trim, Normalize::StripSeparators, Normalize::Upper], ..rule.clone() };
        assert_eq!(plain.normalize("\u{00A0}NID\u{2013}123\u{200B}456"), "NID123456");
        assert_ne!(plain.normalize("ＮＩＤ１２３４５６"), "NID123456");
    }
}

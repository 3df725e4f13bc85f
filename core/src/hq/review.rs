//! The identity review queue's vocabulary, shared by the transform that raises reviews, the
//! sinks that store them and the `identity` command that lists them.
//!
//! A review is about person records; its id is a function of what it is about (a name-based
//! uuid), so that the same finding raised again (a replay, a restart, the same correction read
//! twice) is the same entry, whichever stage or run raised it.

/// A merge the transform made: it needs nobody, but can be confirmed or (later) split.
pub const MERGED: &str = "merged";
/// Something HQ will not decide alone: a person should look.
pub const OPEN: &str = "open";
/// A possible duplicate nothing joined: a suggestion only.
pub const SUGGESTED: &str = "suggested";
/// A person looked and kept the merge.
pub const CONFIRMED: &str = "confirmed";
/// A person looked and undid the merge: the records are two people (`identity split`).
pub const SPLIT: &str = "split";

/// Every status, in the order the `identity` command shows them.
pub const STATUSES: [&str; 5] = [OPEN, SUGGESTED, MERGED, CONFIRMED, SPLIT];

/// Merged: two records held the same identifier.
pub const IDENTIFIER_LINK: &str = "identifier_link";
/// Merged: a site merged two of its own records (`person_merge_log`).
pub const SITE_MERGE: &str = "site_merge";
/// Merged: a registration date changed which record survives.
pub const SURVIVOR_CHANGE: &str = "survivor_change";
/// Open: an identifier of a merged person was voided at its site.
pub const IDENTIFIER_VOIDED: &str = "identifier_voided";
/// Open: an identifier of a merged person was deleted at its site.
pub const IDENTIFIER_DELETED: &str = "identifier_deleted";
/// Open: an identifier of a merged person was changed to another value at its site.
pub const IDENTIFIER_CORRECTED: &str = "identifier_corrected";

/// Suggested: the same name, sex and birthdate at two clinics, different identifiers.
pub const NEAR_MISS: &str = "near_miss";
/// Open: records a person split apart hold the same identifier (or are linked through a third
/// record); they were not merged again.
pub const IDENTIFIER_SHARED: &str = "identifier_shared";

/// Every reason, with what a data manager reads for it.
pub const REASONS: [(&str, &str); 8] = [
    (IDENTIFIER_LINK, "merged: two records hold the same identifier"),
    (SITE_MERGE, "merged: a clinic merged two of its own records"),
    (SURVIVOR_CHANGE, "merged: a registration date changed which record survives"),
    (IDENTIFIER_VOIDED, "an identifier that joined this person was voided at a clinic; the merge is kept until someone decides"),
    (IDENTIFIER_DELETED, "an identifier that joined this person was deleted at a clinic; the merge is kept until someone decides"),
    (IDENTIFIER_CORRECTED, "an identifier that joined this person was changed at a clinic; the merge is kept until someone decides"),
    (IDENTIFIER_SHARED, "records someone split apart are linked again (a shared identifier, or a record linked to both); they were not merged"),
    (NEAR_MISS, "suggestion: the same name, sex and birthdate at two clinics, with different identifiers; nothing was merged"),
];

/// The review reason of a merge's reason (`identifier`, `site_merge`, `survivor_change`).
pub fn merge_reason(merge_reason: &str) -> &'static str {
    match merge_reason {
        "identifier" => IDENTIFIER_LINK,
        "site_merge" => SITE_MERGE,
        _ => SURVIVOR_CHANGE,
    }
}

/// The id of the review of the merge of `loser` into `winner` (the transform raises it, the
/// HQ sink links its merge record to it).
pub fn merge_review_id(loser: &str, winner: &str) -> String {
    review_id(&["merge", loser, winner])
}

/// What a data manager reads for `reason`.
pub fn describe(reason: &str) -> &'static str {
    REASONS.iter().find(|(r, _)| *r == reason).map_or("", |(_, d)| d)
}

/// A data manager's decision on a review, as written to `omrs.identity.decisions` by
/// `omrs-stream identity confirm` and consumed by the transform (in its transaction, like a
/// site's change). It carries the review as the data manager saw it at HQ, so that the
/// transform can re-emit it with its new status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// `confirm` or `split`.
    pub action: String,
    pub review_id: String,
    pub reason: String,
    pub person: String,
    pub records: Vec<String>,
    pub evidence: serde_json::Value,
    pub site: String,
    /// The review's first event time.
    pub ts_ms: i64,
    pub decided: Decided,
    /// A split: the records that stay together on one side (`--keep`, or the survivor's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// A split: the records of the other side. No record of `keep` is the same person as a
    /// record of `other` from then on, whatever links them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other: Vec<String>,
}

/// Who decided, when, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Decided {
    pub by: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The actions a decision may take.
pub const ACTIONS: [&str; 2] = ["confirm", "split"];

impl Decision {
    /// The status a decision gives its review, or why it is not a decision this version knows.
    pub fn status(&self) -> Result<&'static str, String> {
        match self.action.as_str() {
            "confirm" => Ok(CONFIRMED),
            "split" if self.keep.is_empty() || self.other.is_empty() => {
                Err(format!("split of review {}: both sides need a record (keep {}, other {})", self.review_id, self.keep.len(), self.other.len()))
            }
            "split" if self.keep.iter().any(|k| self.other.contains(k)) => Err(format!("split of review {}: a record is on both sides", self.review_id)),
            "split" => Ok(SPLIT),
            other => Err(format!("decision on review {}: unknown action `{other}` (known: {})", self.review_id, ACTIONS.join(", "))),
        }
    }
}

/// Namespace of review ids.
const NS: uuid::Uuid = uuid::Uuid::from_u128(0x6f6d_7273_2d72_6576_6965_772d_6964_0001);

/// The id of the review about `parts` (joined with a separator no uuid or code holds).
pub fn review_id(parts: &[&str]) -> String {
    uuid::Uuid::new_v5(&NS, parts.join("\u{1f}").as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_finding_has_the_same_id_and_another_one_another() {
        assert_eq!(review_id(&["merge", "a", "b"]), review_id(&["merge", "a", "b"]));
        assert_ne!(review_id(&["merge", "a", "b"]), review_id(&["merge", "b", "a"]));
        assert_ne!(review_id(&["merge", "ab", ""]), review_id(&["merge", "a", "b"]));
        assert!(REASONS.iter().all(|(r, d)| !d.is_empty() && describe(r) == *d));
    }
}

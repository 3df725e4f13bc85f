//! The one decoder of `omrs.hq.changes` records ([`HqEvent`]).
//!
//! serde parses an internally tagged enum by first buffering the whole record as a tree, then
//! reading the variant out of it: for a change record that is most of the decoding time. Here
//! every field of every variant is read in one pass into [`Fields`], whatever the order of the
//! fields (the `type` tag may come last), and the variant is built from them. The row images of
//! a change are read into whichever [`Image`] the caller picked. Fields another variant would
//! have are ignored, as serde ignores unknown fields of a tagged enum.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value as J;

use super::HqEvent;
use crate::envelope::{ChangeEvent, Image};

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Change,
    Merge,
    Split,
    Watermark,
    Schema,
    Aggregate,
    IdentityReview,
}

/// Every field of every variant, each optional.
#[derive(Deserialize)]
#[serde(bound(deserialize = "R: Deserialize<'de> + Image"))]
struct Fields<R> {
    #[serde(rename = "type")]
    kind: Kind,
    late: Option<bool>,
    person: Option<String>,
    origin_refs: Option<serde_json::Map<String, J>>,
    event: Option<ChangeEvent<R>>,
    winner: Option<String>,
    loser: Option<String>,
    survivor: Option<String>,
    from: Option<String>,
    reason: Option<String>,
    /// `null` is a value here: Some(Null).
    #[serde(default, deserialize_with = "present")]
    evidence: Option<J>,
    site: Option<String>,
    ts_ms: Option<i64>,
    name: Option<String>,
    window_start_ms: Option<i64>,
    window_end_ms: Option<i64>,
    dim: Option<String>,
    value: Option<i64>,
    #[serde(rename = "final")]
    is_final: Option<bool>,
    revision: Option<u32>,
    watermark_ms: Option<i64>,
    review_id: Option<String>,
    status: Option<String>,
    records: Option<Vec<String>>,
    decided: Option<super::review::Decided>,
    schema: Option<crate::shape::TableShape>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<J>, D::Error> {
    J::deserialize(d).map(Some)
}

/// A required field, or its name.
fn need<T>(v: Option<T>, field: &'static str) -> Result<T, &'static str> {
    v.ok_or(field)
}

impl<'de, R: Deserialize<'de> + Image> Deserialize<'de> for HqEvent<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Fields::<R>::deserialize(d)?.build().map_err(D::Error::missing_field)
    }
}

impl<R: Image> Fields<R> {
    /// The variant the tag names, or the name of a field it needs and lacks.
    fn build(self) -> Result<HqEvent<R>, &'static str> {
        let f = self;
        Ok(match f.kind {
            Kind::Change => HqEvent::Change {
                late: need(f.late, "late")?,
                person: f.person,
                origin_refs: f.origin_refs.unwrap_or_default(),
                event: need(f.event, "event")?,
            },
            Kind::Merge => HqEvent::Merge {
                winner: need(f.winner, "winner")?,
                loser: need(f.loser, "loser")?,
                reason: need(f.reason, "reason")?,
                evidence: need(f.evidence, "evidence")?,
                site: need(f.site, "site")?,
                ts_ms: need(f.ts_ms, "ts_ms")?,
            },
            Kind::Split => HqEvent::Split {
                survivor: need(f.survivor, "survivor")?,
                from: need(f.from, "from")?,
                records: need(f.records, "records")?,
                review_id: need(f.review_id, "review_id")?,
                site: need(f.site, "site")?,
                ts_ms: need(f.ts_ms, "ts_ms")?,
            },
            Kind::Watermark => HqEvent::Watermark { ts_ms: need(f.ts_ms, "ts_ms")? },
            Kind::Schema => HqEvent::Schema { site: need(f.site, "site")?, schema: need(f.schema, "schema")?, ts_ms: need(f.ts_ms, "ts_ms")? },
            Kind::Aggregate => HqEvent::Aggregate {
                name: need(f.name, "name")?,
                site: need(f.site, "site")?,
                window_start_ms: need(f.window_start_ms, "window_start_ms")?,
                window_end_ms: need(f.window_end_ms, "window_end_ms")?,
                dim: f.dim.unwrap_or_default(),
                value: need(f.value, "value")?,
                is_final: need(f.is_final, "final")?,
                revision: need(f.revision, "revision")?,
                watermark_ms: need(f.watermark_ms, "watermark_ms")?,
            },
            Kind::IdentityReview => {
                let person = need(f.person, "person")?;
                let reason = need(f.reason, "reason")?;
                let evidence = need(f.evidence, "evidence")?;
                // A record of a version before the review queue: an open review, keyed by
                // what it says.
                let review_id = f.review_id.unwrap_or_else(|| super::review::review_id(&["legacy", &person, &reason, &evidence.to_string()]));
                HqEvent::IdentityReview {
                    review_id,
                    status: f.status.unwrap_or_else(|| super::review::OPEN.to_string()),
                    records: f.records.unwrap_or_else(|| vec![person.clone()]),
                    person,
                    reason,
                    evidence,
                    site: need(f.site, "site")?,
                    ts_ms: need(f.ts_ms, "ts_ms")?,
                    decided: f.decided,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::envelope::{FlatRow, RawPairs, Row};
    use crate::hq::HqEvent;

    const CHANGE: &str = r#"{"type":"change","late":true,"person":"p-2","origin_refs":{"person_id":"p-9"},"event":{"op":"u","site":"site-b","table":"person_name","key":{"person_name_id":3},"uuid":"u-2","before":{"person_name_id":3,"given_name":"A"},"after":{"person_name_id":3,"given_name":"a \"q\" é"},"refs":{"person_id":"p-2"},"source":{"server_id":12,"file":"binlog.000002","pos":9,"row":1,"ts_ms":6,"snapshot":false},"ts_ms":6}}"#;

    /// The record with its top-level fields in reverse order (the tag last).
    fn reversed(json: &str) -> String {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).expect("an object");
        let parts: Vec<String> = v.iter().rev().map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap_or_default(), v)).collect();
        format!("{{{}}}", parts.join(","))
    }

    #[test]
    fn every_record_reads_the_same_in_any_field_order_and_image_form() {
        let records = [
            CHANGE.to_string(),
            r#"{"type":"change","late":false,"event":{"op":"c","site":"site-a","table":"obs","key":{"obs_id":7},"uuid":"u-1","after":{"obs_id":7},"source":{"server_id":11,"file":"b.1","pos":4,"ts_ms":5},"ts_ms":5}}"#.to_string(),
            r#"{"type":"merge","winner":"w","loser":"l","reason":"identifier","evidence":null,"site":"site-a","ts_ms":3}"#.to_string(),
            r#"{"type":"watermark","ts_ms":12}"#.to_string(),
            r#"{"type":"schema","site":"site-a","schema":{"table":"hiv_care","columns":[{"name":"hiv_care_id","type":"int(11)"}],"pk":["hiv_care_id"],"fks":[],"dropped":false,"ddl":"CREATE TABLE hiv_care (hiv_care_id int primary key)"},"ts_ms":7}"#.to_string(),
            r#"{"type":"aggregate","name":"obs_per_day","site":"s","window_start_ms":0,"window_end_ms":86400000,"value":4,"final":true,"revision":1,"watermark_ms":9}"#.to_string(),
            r#"{"type":"identity_review","person":"p","reason":"identifier_voided","evidence":{"v":1},"site":"s","ts_ms":4}"#.to_string(),
            r#"{"type":"identity_review","review_id":"r-1","reason":"identifier_link","status":"merged","person":"p","records":["p","q"],"evidence":{"v":1},"site":"s","ts_ms":4}"#.to_string(),
            r#"{"type":"identity_review","review_id":"r-1","reason":"identifier_link","status":"confirmed","person":"p","records":["p","q"],"evidence":{"v":1},"site":"s","ts_ms":4,"decided":{"by":"dm","at_ms":9,"note":"same mother"}}"#.to_string(),
        ];
        for r in &records {
            let maps: HqEvent<Row> = serde_json::from_str(r).unwrap_or_else(|e| panic!("{r}: {e}"));
            let again = String::from_utf8(maps.to_json()).unwrap_or_default();
            let back: HqEvent<Row> = serde_json::from_str(&again).expect("its own JSON reads back");
            assert_eq!(back, maps);
            let flipped: HqEvent<Row> = serde_json::from_str(&reversed(r)).unwrap_or_else(|e| panic!("{r} reversed: {e}"));
            assert_eq!(flipped, maps, "field order does not matter: {r}");
            let flat: HqEvent<FlatRow> = serde_json::from_str(&reversed(r)).expect("flat");
            assert_eq!(serde_json::to_value(&flat).ok(), serde_json::to_value(&maps).ok(), "{r}");
            let raw: HqEvent<RawPairs<'_>> = serde_json::from_str(r).expect("raw pairs");
            assert_eq!(serde_json::to_value(&raw).ok(), serde_json::to_value(&maps).ok(), "{r}");
        }
        let HqEvent::Change { event, .. } = serde_json::from_str::<HqEvent<RawPairs<'_>>>(CHANGE).expect("decodes") else { panic!("a change") };
        let after = event.after.expect("an after image");
        assert_eq!(after.get("given_name").map(|v| v.get()), Some(r#""a \"q\" é""#));
        assert_eq!(after.at(0).map(|(k, v)| (k, v.get())), Some(("person_name_id", "3")));
    }

    #[test]
    fn a_bad_record_is_refused_with_what_is_wrong() {
        let err = |j: &str| serde_json::from_str::<HqEvent<FlatRow>>(j).expect_err(j).to_string();
        assert!(err(r#"{"type":"change","event":{}}"#).contains("missing field"));
        assert!(err(r#"{"late":false,"type":"change"}"#).contains("missing field `event`"));
        assert!(err(r#"{"type":"watermark"}"#).contains("missing field `ts_ms`"));
        assert!(err(r#"{"type":"nope","ts_ms":1}"#).contains("unknown variant `nope`"));
        assert!(err(r#"{"ts_ms":1}"#).contains("missing field `type`"));
        assert!(err(r#"{"type":"change","#).contains("EOF"));
        let wrong_image = CHANGE.replace(r#""after":{"person_name_id":3,"given_name":"a \"q\" é"}"#, r#""after":[1]"#);
        assert!(serde_json::from_str::<HqEvent<RawPairs<'_>>>(&wrong_image).is_err());
    }
}

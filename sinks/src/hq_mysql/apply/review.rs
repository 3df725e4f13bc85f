//! The identity review queue at HQ (`omrs_sync_identity_review`): every review the transform
//! raised, upserted by its id in the batch's transaction (so exactly once with the offsets).
//! A review raised again (the same merge made again after a survivor change went back and
//! forth) takes the latest reason and evidence, and keeps the status HQ holds: a person's
//! decision is never undone by a replay; a decision (`decided`) sets the status, who, when and
//! why. Open reviews are exported as gauges per reason, with the age of the oldest.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::metrics::metrics;

use super::sql::{datetime, db};
use crate::SinkError;

/// One review as it is stored.
#[derive(Debug, Clone)]
pub(super) struct ReviewRow {
    pub(super) review_id: String,
    pub(super) reason: String,
    pub(super) status: String,
    pub(super) person: String,
    pub(super) records: String,
    pub(super) evidence: String,
    pub(super) site: String,
    pub(super) ts_ms: i64,
    pub(super) decided: Option<omrs_core::hq::review::Decided>,
}

/// Upserts the batch's reviews (the last one of an id, in stream order, gives its reason,
/// evidence and person).
pub(super) async fn upsert_reviews(conn: &mut Conn, rows: Vec<ReviewRow>) -> Result<u64, SinkError> {
    let n = rows.len() as u64;
    for chunk in rows.chunks(200) {
        let marks = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, NOW(3), ?, ?, ?)"; chunk.len()].join(",");
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 12);
        for r in chunk {
            let d = r.decided.as_ref();
            params.extend([
                Value::from(r.review_id.as_str()),
                Value::from(r.reason.as_str()),
                Value::from(r.status.as_str()),
                Value::from(r.person.as_str()),
                Value::from(r.records.as_str()),
                Value::from(r.evidence.as_str()),
                Value::from(r.site.as_str()),
                Value::from(r.ts_ms),
                Value::from(datetime(r.ts_ms)),
                Value::from(d.map(|d| datetime(d.at_ms))),
                Value::from(d.map(|d| d.by.as_str())),
                Value::from(d.and_then(|d| d.note.as_deref())),
            ]);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO omrs_sync_identity_review
                   (review_id, reason, status, person_uuid, records, evidence, site, first_seen_ms, first_seen, raised_at, decided_at, decided_by, note)
                 VALUES {marks}
                 ON DUPLICATE KEY UPDATE person_uuid = VALUES(person_uuid), reason = VALUES(reason), records = VALUES(records),
                   status = IF(VALUES(decided_by) IS NOT NULL, VALUES(status), status),
                   decided_at = IF(VALUES(decided_by) IS NOT NULL, VALUES(decided_at), decided_at),
                   note = IF(VALUES(decided_by) IS NOT NULL, VALUES(note), note),
                   decided_by = COALESCE(VALUES(decided_by), decided_by),
                   evidence = VALUES(evidence), site = VALUES(site),
                   first_seen = IF(VALUES(first_seen_ms) < first_seen_ms, VALUES(first_seen), first_seen),
                   first_seen_ms = LEAST(first_seen_ms, VALUES(first_seen_ms))"
            ),
            params,
        )
        .await
        .map_err(db("writing the identity review queue"))?;
    }
    Ok(n)
}

/// Sets `omrs_stream_identity_reviews_open` and the oldest open review's age, per reason (a
/// reason with none left reads 0).
pub(crate) async fn export_gauges(conn: &mut Conn) -> Result<(), SinkError> {
    let rows: Vec<(String, i64, i64)> = conn
        .query(
            "SELECT reason, COUNT(*), CAST(TIMESTAMPDIFF(SECOND, MIN(raised_at), NOW(3)) AS SIGNED)
               FROM omrs_sync_identity_review WHERE status = 'open' GROUP BY reason",
        )
        .await
        .map_err(db("counting open identity reviews"))?;
    let m = metrics();
    for (reason, _) in omrs_core::hq::review::REASONS {
        let (n, age) = rows.iter().find(|r| r.0 == reason).map_or((0, 0), |r| (r.1, r.2.max(0)));
        m.identity_reviews_open.with_label_values(&[reason]).set(n);
        m.identity_review_oldest_age.with_label_values(&[reason]).set(age);
    }
    Ok(())
}

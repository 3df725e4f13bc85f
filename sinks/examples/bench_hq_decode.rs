//! Benchmark of the HQ sink's decoding of `omrs.hq.changes` records (no services needed):
//! the bench's obs-heavy mix (`bench_common::patient`, 30 records per patient), and the same
//! mix with every column of a site's full row image (obs: 30 columns, the rest NULL).
//!
//! Each set is decoded by core's one decoder of the topic (`HqEvent<R>`) with the row images
//! in each form a reader picks: the HQ sink's (`Record::decode`: `FlatRow`s, with the payload
//! copy), the Parquet sink's (`RawPairs` borrowed from the record), and `serde_json` maps (the
//! general paths and tools). Best of 5 passes, in one thread. Prints `BENCH <name> <value> <unit>`.
//!
//!   usage: cargo run --release -p omrs-sinks --example bench_hq_decode [PATIENTS]

use std::time::Instant;

use omrs_sinks::hq_mysql::apply::Record;
use serde_json::Value as J;

mod bench_common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The columns of OpenMRS 2.x `obs`, in table order: a site's binlog row image carries each.
const OBS_COLUMNS: &[&str] = &[
    "obs_id", "person_id", "concept_id", "encounter_id", "order_id", "obs_datetime", "location_id", "obs_group_id", "accession_number",
    "value_group_id", "value_coded", "value_coded_name_id", "value_drug", "value_datetime", "value_numeric", "value_modifier", "value_text",
    "value_complex", "comments", "creator", "date_created", "voided", "voided_by", "date_voided", "void_reason", "uuid", "previous_version",
    "form_namespace_and_path", "status", "interpretation",
];

/// The Parquet sink's own decoder before stop 32 (`parquet/fast.rs` at `8e0b9a0`), kept here
/// only as the baseline of the lake's form: every string borrowed, `key` and the envelope's
/// other fields skipped, no check for repeated columns, and a `change` record only.
mod old_lake {
    use std::borrow::Cow;

    use omrs_core::envelope::Op;
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde::Deserialize;
    use serde_json::value::RawValue;

    pub struct Pairs<'a>(#[allow(dead_code)] pub Vec<(&'a str, &'a RawValue)>);

    impl<'de: 'a, 'a> Deserialize<'de> for Pairs<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                type Value = Pairs<'a>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Pairs<'a>, A::Error> {
                    let mut v = Vec::with_capacity(m.size_hint().unwrap_or(24));
                    while let Some((k, val)) = m.next_entry::<&'de str, &'de RawValue>()? {
                        v.push((k, val));
                    }
                    Ok(Pairs(v))
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    pub struct RawChange<'a> {
        late: bool,
        #[serde(default, borrow)]
        person: Option<Cow<'a, str>>,
        #[serde(default)]
        origin_refs: serde_json::Map<String, serde_json::Value>,
        #[serde(borrow)]
        event: RawEvent<'a>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct RawEvent<'a> {
        op: Op,
        #[serde(borrow)]
        site: Cow<'a, str>,
        #[serde(default, borrow)]
        table: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        uuid: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        before: Option<Pairs<'a>>,
        #[serde(default, borrow)]
        after: Option<Pairs<'a>>,
        #[serde(default, borrow)]
        refs: Option<Pairs<'a>>,
        #[serde(borrow)]
        source: RawSource<'a>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct RawSource<'a> {
        #[serde(borrow)]
        file: Cow<'a, str>,
        pos: u64,
        #[serde(default)]
        row: u32,
        ts_ms: i64,
        #[serde(default)]
        snapshot: bool,
    }
}

/// Best of 5 passes: (µs per record, records per second).
fn time(payloads: &[Vec<u8>], decode: impl Fn(&[u8]) -> bool) -> (f64, f64) {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut ok = 0usize;
        for p in payloads {
            ok += decode(p) as usize;
        }
        assert_eq!(ok, payloads.len(), "every record decodes");
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (best * 1e6 / payloads.len() as f64, payloads.len() as f64 / best)
}

fn main() {
    let patients: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let meta = bench_common::Meta {
        user: uuid::Uuid::new_v4().to_string(),
        location: uuid::Uuid::new_v4().to_string(),
        concept: (0..12).map(|_| uuid::Uuid::new_v4().to_string()).collect(),
        enc_type: uuid::Uuid::new_v4().to_string(),
        visit_type: uuid::Uuid::new_v4().to_string(),
    };
    let mut seq = 0;
    let events: Vec<_> = (0..patients).flat_map(|i| bench_common::patient("site-a", &meta, i + 1, &mut seq, 1_790_000_000_000)).collect();
    let bench: Vec<Vec<u8>> = events.iter().map(|e| e.to_json()).collect();
    // The same events with a full obs row image, as a site's binlog gives it.
    let full: Vec<Vec<u8>> = events
        .into_iter()
        .map(|mut e| {
            if let omrs_core::hq::HqEvent::Change { event, .. } = &mut e {
                if event.table.as_deref() == Some("obs") {
                    if let Some(after) = &event.after {
                        let mut row = serde_json::Map::new();
                        for c in OBS_COLUMNS {
                            row.insert(c.to_string(), after.get(*c).cloned().unwrap_or(J::Null));
                        }
                        event.after = Some(row);
                    }
                }
            }
            e.to_json()
        })
        .collect();

    let mut lines = Vec::new();
    for (name, set) in [("bench_mix", &bench), ("full_obs_images", &full)] {
        let bytes: usize = set.iter().map(Vec::len).sum();
        let (maps_us, _) = time(set, |p| serde_json::from_slice::<omrs_core::hq::HqEvent>(p).is_ok());
        let (pairs_us, _) = time(set, |p| serde_json::from_slice::<omrs_core::hq::HqEvent<omrs_core::envelope::RawPairs<'_>>>(p).is_ok());
        let (old_lake_us, _) = time(set, |p| !p.starts_with(br#"{"type":"change","#) || serde_json::from_slice::<old_lake::RawChange<'_>>(p).is_ok());
        let (flat_us, flat_rate) = time(set, |p| Record::decode(0, 0, p.to_vec()).decoded.is_ok());
        eprintln!(
            "{name}: {} records, {} bytes each on average; JSON maps {maps_us:.2} µs/record, raw pairs (the lake's) {pairs_us:.2} µs/record (its own decoder before stop 32: {old_lake_us:.2}), the HQ sink's decode {flat_us:.2} µs/record ({flat_rate:.0} records/s, with the payload copy)",
            set.len(),
            bytes / set.len()
        );
        lines.push(format!("BENCH hq_decode_{name}_maps_us {maps_us:.2} us"));
        lines.push(format!("BENCH hq_decode_{name}_sink_us {flat_us:.2} us"));
        lines.push(format!("BENCH hq_decode_{name}_raw_pairs_us {pairs_us:.2} us"));
        lines.push(format!("BENCH hq_decode_{name}_old_lake_us {old_lake_us:.2} us"));
    }
    for l in lines {
        println!("{l}");
    }
}

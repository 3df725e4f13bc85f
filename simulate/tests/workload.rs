//! The simulator against real MariaDB site servers: referential integrity, counts against the
//! manifest, cross-site identity truth, OpenMRS-shaped edits and merges, and determinism.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::*;
use mysql_async::prelude::Queryable;
use omrs_simulate::manifest::Manifest;
use omrs_simulate::NATIONAL_ID_TYPE_UUID;

const CORE_TABLES: &[&str] = &[
    "person",
    "person_name",
    "person_address",
    "patient",
    "patient_identifier",
    "visit",
    "encounter",
    "encounter_provider",
    "obs",
    "person_merge_log",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_300_patients_with_duplicates_merges_and_edits() {
    let cfg = config();
    let db = "sim_test_workload";
    let args = args(db, 20261126, 300, 0.2);
    let manifest: Manifest = omrs_simulate::run(&cfg, &args).await.expect("simulation runs");
    let on_disk: Manifest = serde_json::from_slice(&std::fs::read(&args.manifest).unwrap()).unwrap();
    assert_eq!(on_disk.row_changes, manifest.row_changes);
    assert_eq!(manifest.sites.len(), 3);

    let rule = &cfg.identity.identifiers[0];
    assert_eq!(rule.identifier_type_uuid, NATIONAL_ID_TYPE_UUID);

    let mut void_merges = 0;
    let mut previous_versions = 0;
    for (site_cfg, site) in cfg.sites.iter().zip(&manifest.sites) {
        let mut c = connect(site_cfg, db).await;

        // 1. No foreign-key orphans: every FK of the core tables, checked with SQL.
        let fks: Vec<(String, String, String, String)> = c
            .query(format!(
                "SELECT table_name, column_name, referenced_table_name, referenced_column_name
                 FROM information_schema.key_column_usage
                 WHERE table_schema = '{db}' AND referenced_table_name IS NOT NULL
                   AND table_name IN ({})",
                CORE_TABLES.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(",")
            ))
            .await
            .unwrap();
        assert!(fks.len() > 40, "{}: only {} FKs found", site.name, fks.len());
        for (t, col, rt, rc) in &fks {
            let orphans: i64 = c
                .query_first(format!(
                    "SELECT COUNT(*) FROM `{t}` c LEFT JOIN `{rt}` p ON c.`{col}` = p.`{rc}` WHERE c.`{col}` IS NOT NULL AND p.`{rc}` IS NULL"
                ))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(orphans, 0, "{}: {t}.{col} -> {rt}.{rc} has {orphans} orphans", site.name);
        }

        // 2. Every table's count equals the manifest.
        let tables: Vec<String> = c
            .query(format!("SELECT table_name FROM information_schema.tables WHERE table_schema = '{db}' AND table_type = 'BASE TABLE'"))
            .await
            .unwrap();
        assert_eq!(tables.len(), 148, "{}: the demo schema has 148 tables", site.name);
        assert_eq!(site.counts.len(), 148);
        for t in &tables {
            let n: i64 = c.query_first(format!("SELECT COUNT(*) FROM `{t}`")).await.unwrap().unwrap();
            assert_eq!(Some(&n), site.counts.get(t), "{}: {t}", site.name);
        }

        // Clinical shape: obs groups, coded answers, numeric values, edits, merges.
        let grouped: i64 = c.query_first("SELECT COUNT(*) FROM obs WHERE obs_group_id IS NOT NULL").await.unwrap().unwrap();
        assert!(grouped > 0, "{}: no obs groups", site.name);
        let bad_coded: i64 = c
            .query_first(
                "SELECT COUNT(*) FROM obs o JOIN concept c ON c.concept_id = o.concept_id
                 JOIN concept_datatype d ON d.concept_datatype_id = c.datatype_id
                 WHERE (d.name = 'Numeric' AND o.value_numeric IS NULL)
                    OR (d.name = 'Coded' AND o.value_coded IS NULL)
                    OR (d.name = 'Text' AND o.value_text IS NULL)",
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bad_coded, 0, "{}: obs whose value does not match the concept datatype", site.name);
        let out_of_range: i64 = c
            .query_first(
                "SELECT COUNT(*) FROM obs o JOIN concept_numeric n ON n.concept_id = o.concept_id
                 WHERE (n.hi_absolute IS NOT NULL AND o.value_numeric > n.hi_absolute * 1.1)
                    OR (n.low_absolute IS NOT NULL AND o.value_numeric < n.low_absolute)",
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out_of_range, 0, "{}: numeric obs out of their concept's absolute range", site.name);
        let edited: i64 = c
            .query_first("SELECT COUNT(*) FROM obs n JOIN obs o ON o.obs_id = n.previous_version WHERE o.voided = 1 AND n.voided = 0")
            .await
            .unwrap()
            .unwrap();
        previous_versions += edited;
        let merges: Vec<(i64, i64, String)> = c
            .query(
                "SELECT l.winner_person_id, l.loser_person_id, p.void_reason FROM person_merge_log l
                 JOIN patient p ON p.patient_id = l.loser_person_id",
            )
            .await
            .unwrap();
        for (winner, loser, reason) in &merges {
            assert_eq!(reason, &format!("Merged with patient #{winner}"), "{}", site.name);
            let left: i64 = c
                .query_first(format!("SELECT (SELECT COUNT(*) FROM encounter WHERE patient_id = {loser}) + (SELECT COUNT(*) FROM visit WHERE patient_id = {loser}) + (SELECT COUNT(*) FROM obs WHERE person_id = {loser})"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(left, 0, "{}: loser {loser} still owns clinical data", site.name);
        }
        void_merges += merges.len();
        let changed: i64 = c
            .query_first("SELECT COUNT(*) FROM person_name WHERE date_changed IS NOT NULL AND changed_by IS NOT NULL")
            .await
            .unwrap()
            .unwrap();
        assert!(changed > 0, "{}: no name corrections", site.name);
    }
    assert!(previous_versions > 0, "no obs edits with previous_version");
    assert_eq!(void_merges, manifest.site_merges.len());
    assert!(!manifest.site_merges.is_empty(), "no site-side merges");

    // 3. Every duplicate group really shares a National ID after normalisation.
    let mut nid_by_uuid: HashMap<String, Vec<String>> = HashMap::new();
    for site_cfg in &cfg.sites {
        let mut c = connect(site_cfg, db).await;
        let rows: Vec<(String, String)> = c
            .query(format!(
                "SELECT pe.uuid, pi.identifier FROM patient_identifier pi
                 JOIN patient_identifier_type t ON t.patient_identifier_type_id = pi.identifier_type
                 JOIN person pe ON pe.person_id = pi.patient_id
                 WHERE t.uuid = '{NATIONAL_ID_TYPE_UUID}' AND pi.voided = 0"
            ))
            .await
            .unwrap();
        for (uuid, id) in rows {
            nid_by_uuid.entry(uuid).or_default().push(id);
        }
    }
    let mut groups = 0;
    let mut three_site = 0;
    let mut late = 0;
    let mut noisy = 0;
    for h in &manifest.humans {
        let sites: BTreeSet<&str> = h.records.iter().map(|r| r.site.as_str()).collect();
        if sites.len() < 2 {
            continue;
        }
        groups += 1;
        if sites.len() == 3 {
            three_site += 1;
        }
        let want = h.national_id.as_deref().expect("a cross-site duplicate has a National ID");
        for r in h.records.iter().filter(|r| r.kind != "local_dup") {
            let ids = nid_by_uuid.get(&r.person_uuid).unwrap_or_else(|| panic!("{} {} has no National ID at the site", r.site, r.person_uuid));
            assert_eq!(ids.len(), 1);
            assert_eq!(rule.normalize(&ids[0]), want, "{} {}: {:?}", r.site, r.person_uuid, ids);
            assert_eq!(Some(&ids[0]), r.national_id_raw.as_ref());
            if !r.national_id_at_registration {
                late += 1;
            }
            if ids[0] != want {
                noisy += 1;
            }
        }
    }
    assert!((35..=90).contains(&groups), "{groups} duplicate groups for 300 people at 20 %");
    assert!(three_site > 0, "no three-site people");
    assert!(late > 0, "no National ID added late");
    assert!(noisy > 0, "no formatting noise");

    // Expected HQ counts come from the truth: one active patient per human.
    let records: usize = manifest.humans.iter().map(|h| h.records.len()).sum();
    let merged: usize = manifest.humans.iter().flat_map(|h| &h.records).filter(|r| r.merged_into.is_some()).count();
    assert_eq!(manifest.expected_hq.active_patients as usize, manifest.humans.len());
    // Every human names its survivor among its records; HQ logs each record it merges away that
    // its site did not merge away itself (when HQ keeps the record a site merged away, the site's
    // winner is one of those).
    assert!(manifest.humans.iter().all(|h| h.survivor_uuid.as_ref().is_some_and(|s| h.records.iter().any(|r| &r.person_uuid == s))));
    let site_merged_survivors = manifest.humans.iter().filter(|h| h.records.iter().any(|r| r.merged_into.is_some() && Some(&r.person_uuid) == h.survivor_uuid.as_ref())).count();
    assert_eq!(manifest.expected_hq.hq_merges as usize, records - merged - manifest.humans.len() + site_merged_survivors);
    assert_eq!(manifest.expected_hq.tables["patient"] as usize, records);

    for site in &cfg.sites {
        drop_db(site, db).await;
    }
}

async fn logical_rows(db: &str) -> BTreeMap<String, BTreeSet<String>> {
    let cfg = config();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for site in &cfg.sites {
        let mut c = connect(site, db).await;
        let queries = [
            ("person", "SELECT CONCAT_WS('|', uuid, gender, birthdate, voided) FROM person"),
            ("person_name", "SELECT CONCAT_WS('|', uuid, given_name, family_name, voided) FROM person_name"),
            ("person_address", "SELECT CONCAT_WS('|', uuid, address1, city_village) FROM person_address"),
            ("patient_identifier", "SELECT CONCAT_WS('|', uuid, identifier, identifier_type, voided) FROM patient_identifier"),
            ("visit", "SELECT CONCAT_WS('|', uuid, date_started, voided) FROM visit"),
            ("encounter", "SELECT CONCAT_WS('|', e.uuid, e.encounter_datetime, e.voided, p.uuid) FROM encounter e JOIN person p ON p.person_id = e.patient_id"),
            ("obs", "SELECT CONCAT_WS('|', o.uuid, c.uuid, o.value_numeric, o.value_coded, o.value_text, o.value_datetime, o.voided) FROM obs o JOIN concept c ON c.concept_id = o.concept_id"),
            ("person_merge_log", "SELECT uuid FROM person_merge_log"),
        ];
        for (table, q) in queries {
            let rows: Vec<String> = c.query(q).await.unwrap();
            out.entry(table.into()).or_default().extend(rows.into_iter().map(|r| format!("{}|{r}", site.name)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_logical_rows() {
    let cfg = config();
    let (a, b) = ("sim_test_det_a", "sim_test_det_b");
    omrs_simulate::run(&cfg, &args(a, 99, 120, 0.25)).await.unwrap();
    omrs_simulate::run(&cfg, &args(b, 99, 120, 0.25)).await.unwrap();
    let (ra, rb) = (logical_rows(a).await, logical_rows(b).await);
    for (table, rows) in &ra {
        assert!(!rows.is_empty(), "{table} is empty");
        assert_eq!(rows, &rb[table], "{table} differs between two runs with seed 99");
    }
    // A different seed gives different people.
    let c = "sim_test_det_c";
    omrs_simulate::run(&cfg, &args(c, 100, 120, 0.25)).await.unwrap();
    let rc = logical_rows(c).await;
    assert_ne!(ra["person"], rc["person"]);
    for site in &cfg.sites {
        for db in [a, b, c] {
            drop_db(site, db).await;
        }
    }
}

//! The simulator's adversarial identity mode at a high rate (issue #22 §3), through the whole
//! pipeline on real services, five sites: National IDs pasted with Unicode dashes, full-width
//! forms and invisible spaces must still join a person's registrations; people with another's
//! name, sex and birthdate, and National IDs one digit apart from another's, must stay apart;
//! misprinted numbers corrected by update, void-and-add or delete-and-add after HQ joined
//! records on them; registration dates fixed back (before 1970 too) and put back again, which
//! moves the survivor back and forth. The sites run in five time zones (UTC, Nairobi, UTC-5,
//! Lima, UTC+5:30), one clock 10 minutes behind, one that jumps a day ahead and back. Judged by
//! `verify --manifest --lake` (presence, values, and every human exactly one unvoided patient,
//! the survivor the simulator expects, by its own truth), and by what HQ holds.

mod common;

use common::hq::*;
use common::*;
use mysql_async::prelude::Queryable;
use serde_json::Value as J;

const SITES: [&str; 5] = ["site-a", "site-b", "site-c", "site-d", "site-e"];
const PORTS: [u16; 5] = [3311, 3312, 3313, 3314, 3315];

/// Two more sites (started by `scripts/dev-up … site-d site-e`), in their own time zones.
fn extra_sites(database: &str) -> String {
    [("site-d", 3314, "America/Lima"), ("site-e", 3315, "+05:30")]
        .iter()
        .map(|(name, port, zone)| {
            format!(
                "[[sites]]\nname = \"{name}\"\ntime_zone = \"{zone}\"\n[sites.database]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"cdc\"\npassword = \"cdc\"\ndatabase = \"{database}\"\n\n"
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sites_of_adversarial_identity_consolidate_by_the_simulators_truth() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tadv")), database: unique("adv") };
    let hq_db = unique("openmrs_hq_adv");
    let lake = p.dir.path().join("lake");
    let lake_line = format!("path = \"{}\"", lake.display());
    let more = format!("{}[hq.database]\n", extra_sites(&p.database));
    let cfg_path = p.config(
        &hq_db,
        &[
            ("path = \"${OMRS_LAKE:-/var/lib/omrs-stream/lake}\"", &lake_line),
            ("name = \"site-b\"\n", "name = \"site-b\"\ntime_zone = \"Africa/Nairobi\"\n"),
            ("name = \"site-c\"\n", "name = \"site-c\"\ntime_zone = \"-05:00\"\n"),
            ("[hq.database]\n", &more),
        ],
    );
    p.run(&cfg_path, &["topics", "apply"]);
    let cfg = omrs_core::config::Config::load(&cfg_path).unwrap();
    let args = omrs_simulate::SimulateArgs { sites: 5, adversarial: 0.5, dup_fraction: 0.4, clock_trouble: true, ..workload(&p, 250, 23) };
    // The agents are there before the clinics' work (as deployed): they see every correction
    // as it happens, not only the corrected state a later snapshot would show.
    omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { provision_only: true, ..args.clone() }).await.unwrap();
    p.ingest(&cfg_path, &SITES, true);
    let manifest = omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { no_provision: true, ..args.clone() }).await.unwrap();
    p.ingest(&cfg_path, &SITES, true);
    p.run(&cfg_path, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg_path, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    p.run(&cfg_path, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    p.run(&cfg_path, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);

    // The workload is adversarial, by the simulator's own record: pasted identifiers at the
    // sites, numbers one digit apart, and (at HQ) different people sharing name and birthdate.
    let pasted = manifest.humans.iter().flat_map(|h| &h.records).filter(|r| r.national_id_raw.as_deref().is_some_and(|s| !s.is_ascii())).count();
    assert!(pasted >= 20, "{pasted} pasted identifiers");
    let ids: Vec<&String> = manifest.humans.iter().filter_map(|h| h.national_id.as_ref()).collect();
    let one_apart = ids.windows(2).filter(|w| w[0].len() == w[1].len() && w[0].chars().zip(w[1].chars()).filter(|(a, b)| a != b).count() == 1).count();
    assert!(one_apart >= 10, "{one_apart} identifier pairs one digit apart");
    // Misprints corrected each of the three ways; registration dates fixed both ways.
    let records: Vec<_> = manifest.humans.iter().flat_map(|h| &h.records).collect();
    for fix in ["identifier_updated", "identifier_voided_and_replaced", "identifier_deleted_and_replaced", "date_created_backdated", "date_created_restored"] {
        let n = records.iter().filter(|r| r.fixes.iter().any(|f| f == fix)).count();
        assert!(n >= 2, "{n} records with {fix}");
    }
    // Some people were joined on a misprint that one of their sites then corrected (another
    // record still holds only the misprint, the corrected one holds both).
    let joined_on_misprint = manifest
        .humans
        .iter()
        .filter(|h| h.records.iter().any(|r| r.national_ids.len() == 1 && h.records.iter().any(|c| c.national_ids.len() == 2 && c.national_ids[0] == r.national_ids[0])))
        .count();
    assert!(joined_on_misprint >= 2, "{joined_on_misprint} people joined on a misprint that one site then corrected");
    let mut h = hq(&hq_db).await;
    let twins: i64 = count(
        &mut h,
        "SELECT COUNT(*) FROM (SELECT n.given_name, n.family_name, p.birthdate, p.gender FROM person p JOIN patient pa ON pa.patient_id = p.person_id AND pa.voided = 0
           JOIN person_name n ON n.person_id = p.person_id AND n.voided = 0 AND n.preferred = 1 WHERE p.voided = 0
           GROUP BY 1, 2, 3, 4 HAVING COUNT(DISTINCT p.person_id) > 1) t",
    )
    .await;
    assert!(twins >= 10, "{twins} groups of unvoided patients sharing name, sex and birthdate");
    let pre_epoch: i64 = count(&mut h, "SELECT COUNT(*) FROM person WHERE date_created < '1970-01-01'").await;
    assert!(pre_epoch >= 1, "{pre_epoch} people registered before 1970");

    // Every human exactly one unvoided patient, the expected survivor; values and the lake
    // consistent.
    let manifest_path = p.dir.path().join("manifest.json");
    let v = bin().arg("--config").arg(&cfg_path).args(["verify", "--json", "--lake"]).arg(&lake).arg("--manifest").arg(&manifest_path).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert!(v.status.success() && report["ok"] == J::Bool(true), "verify: {}\n{}", String::from_utf8_lossy(&v.stderr), serde_json::to_string_pretty(&report).unwrap_or_default());
    assert_eq!(report["manifest"]["wrong"], 0);
    assert_eq!(report["manifest"]["wrong_survivor"], 0);
    assert_eq!(report["manifest"]["humans"].as_u64(), Some(manifest.humans.len() as u64));
    assert_eq!(report["manifest"]["active_patients"].as_u64(), Some(manifest.expected_hq.active_patients));

    // The lake holds the same review queue as HQ (verify compares them).
    assert_eq!(report["lake_reviews"]["differing"], 0, "{}", report["lake_reviews"]);

    // The review queue, by the simulator's truth (issue #23 §1). Every merge HQ made has its
    // review (status merged). Every open review is about a record the simulator corrected,
    // for the reason of that correction, on the number it corrected (its own canonical form,
    // not the pipeline's normaliser's).
    let merges = count(&mut h, "SELECT COUNT(*) FROM omrs_sync_identity_merge").await;
    let unreviewed = count(&mut h, "SELECT COUNT(*) FROM omrs_sync_identity_merge m LEFT JOIN omrs_sync_identity_review r ON r.review_id = m.review_id WHERE r.review_id IS NULL OR r.status <> 'merged'").await;
    assert!(merges >= 20 && unreviewed == 0, "{merges} merges, {unreviewed} without a review in status merged");
    assert_eq!(report["lake_reviews"]["hq"].as_i64(), Some(count(&mut h, "SELECT COUNT(*) FROM omrs_sync_identity_review").await));
    let by_uuid: std::collections::HashMap<&str, (&omrs_simulate::manifest::HumanManifest, &omrs_simulate::manifest::RecordManifest)> =
        manifest.humans.iter().flat_map(|hm| hm.records.iter().map(move |r| (r.person_uuid.as_str(), (hm, r)))).collect();
    let open: Vec<(String, String, String, String)> =
        h.query("SELECT review_id, reason, records, evidence FROM omrs_sync_identity_review WHERE status = 'open' ORDER BY review_id").await.unwrap();
    assert!(!open.is_empty(), "no open review, though records joined on a misprint were corrected");
    for (id, reason, records, evidence) in &open {
        let recs: Vec<String> = serde_json::from_str(records).unwrap();
        let (_, r) = by_uuid[recs[0].as_str()];
        let fix = match reason.as_str() {
            "identifier_corrected" => "identifier_updated",
            "identifier_voided" => "identifier_voided_and_replaced",
            "identifier_deleted" => "identifier_deleted_and_replaced",
            other => panic!("review {id}: reason {other}"),
        };
        assert!(r.fixes.iter().any(|f| f == fix), "review {id} ({reason}) about {} whose fixes are {:?}", r.person_uuid, r.fixes);
        let ev: J = serde_json::from_str(evidence).unwrap();
        assert_eq!(ev["value"].as_str(), r.national_ids.first().map(String::as_str), "review {id}: the misprinted number");
        if reason == "identifier_corrected" {
            assert_eq!(ev["new_value"].as_str(), r.national_ids.get(1).map(String::as_str), "review {id}: the corrected number");
        }
    }

    // Near misses (issue #23 §1), by the simulator's truth: every two records of different
    // humans at two clinics that end with the same name as typed there (case and spacing
    // aside), sex and birthdate, each having held a National ID, are suggested; none merged.
    let norm = |s: &str| s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ");
    let mut namesakes: std::collections::BTreeMap<(String, String), Vec<(usize, &omrs_simulate::manifest::RecordManifest)>> = Default::default();
    for (hi, hm) in manifest.humans.iter().enumerate() {
        for r in hm.records.iter().filter(|r| !r.national_ids.is_empty()) {
            if let (Some(n), Some(sb)) = (&r.name, &r.sex_birthdate) {
                namesakes.entry((norm(n), sb.clone())).or_default().push((hi, r));
            }
        }
    }
    let mut expected = std::collections::BTreeSet::new();
    for group in namesakes.values() {
        for (i, (ha, a)) in group.iter().enumerate() {
            for (hb, b) in &group[i + 1..] {
                if ha != hb && a.site != b.site {
                    let mut pair = [a.person_uuid.clone(), b.person_uuid.clone()];
                    pair.sort();
                    expected.insert(pair);
                }
            }
        }
    }
    let suggested: Vec<(String, String)> = h.query("SELECT records, status FROM omrs_sync_identity_review WHERE reason = 'near_miss'").await.unwrap();
    assert!(suggested.iter().all(|(_, st)| st == "suggested"), "{suggested:?}");
    let suggested: std::collections::BTreeSet<[String; 2]> = suggested.iter().map(|(r, _)| serde_json::from_str(r).unwrap()).collect();
    let missing: Vec<_> = expected.difference(&suggested).collect();
    assert!(expected.len() >= 3 && missing.is_empty(), "{} namesake pairs by the simulator, {} suggested, not suggested: {missing:?}", expected.len(), suggested.len());

    // The data manager's commands on it: the list holds exactly the open reviews; `show` of one
    // gives the human's records, every one, at their clinics.
    let out = bin().arg("--config").arg(&cfg_path).args(["identity", "list", "--status", "open", "--limit", "10000", "--json"]).output().unwrap();
    assert!(out.status.success(), "identity list: {}", String::from_utf8_lossy(&out.stderr));
    let listed: J = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<&str> = listed["reviews"].as_array().unwrap().iter().map(|r| r["review_id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, open.iter().map(|o| o.0.as_str()).collect::<Vec<_>>());
    assert_eq!(listed["counts"]["open"].as_i64(), Some(open.len() as i64));
    let (id, _, records, _) = &open[0];
    let first: Vec<String> = serde_json::from_str(records).unwrap();
    let (human, _) = by_uuid[first[0].as_str()];
    let out = bin().arg("--config").arg(&cfg_path).args(["identity", "show", id, "--json"]).output().unwrap();
    assert!(out.status.success(), "identity show: {}", String::from_utf8_lossy(&out.stderr));
    let shown: J = serde_json::from_slice(&out.stdout).unwrap();
    let mut members: Vec<(String, String)> = shown["members"].as_array().unwrap().iter().map(|m| (m["uuid"].as_str().unwrap().to_string(), m["site"].as_str().unwrap_or("").to_string())).collect();
    members.sort();
    let mut truth: Vec<(String, String)> = human.records.iter().map(|r| (r.person_uuid.clone(), r.site.clone())).collect();
    truth.sort();
    assert_eq!(members, truth, "identity show {id}: the records of the human");
    assert_eq!(shown["survivor"].as_str(), human.survivor_uuid.as_deref());
    assert!(shown["reviews"].as_array().unwrap().iter().any(|r| r["review_id"] == J::String(id.clone())));
    let text = bin().arg("--config").arg(&cfg_path).args(["identity", "show", &first[0]]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    for m in &truth {
        assert!(text.contains(&m.0) && text.contains(&m.1), "identity show (text) lacks {m:?}:\n{text}");
    }

    // A data manager confirms one open review (issue #23 §3): the decision goes through Kafka
    // and the transform to both sinks, once; confirming again changes nothing; the merge stays.
    let confirm = |id: &str| {
        let out = bin()
            .arg("--config")
            .arg(&cfg_path)
            .args(["identity", "confirm", id, "--note", "same person: the card was misprinted", "--by", "dm-test", "--wait", "0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "identity confirm: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let (cid, _, _, _) = &open[0];
    let said = confirm(cid);
    assert!(said.contains("sent"), "{said}");
    p.run(&cfg_path, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg_path, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    p.run(&cfg_path, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);
    let row: Option<(String, Option<String>, Option<String>)> =
        h.exec_first("SELECT status, decided_by, note FROM omrs_sync_identity_review WHERE review_id = ?", (cid,)).await.unwrap();
    assert_eq!(row, Some(("confirmed".into(), Some("dm-test".into()), Some("same person: the card was misprinted".into()))));
    assert_eq!(count(&mut h, "SELECT COUNT(*) FROM omrs_sync_identity_review WHERE status = 'open'").await, open.len() as i64 - 1);
    let q = bin()
        .arg("--config")
        .arg(&cfg_path)
        .args(["query", "--lake"])
        .arg(&lake)
        .args(["--format", "json", &format!("SELECT status, decided_by, note FROM identity.reviews WHERE review_id = '{cid}'")])
        .output()
        .unwrap();
    let lake_row: J = serde_json::from_slice(&q.stdout).unwrap_or(J::Null);
    assert_eq!(lake_row, serde_json::json!([{"status": "confirmed", "decided_by": "dm-test", "note": "same person: the card was misprinted"}]), "{}", String::from_utf8_lossy(&q.stderr));
    assert!(confirm(cid).contains("already confirmed"));
    let again = bin().arg("--config").arg(&cfg_path).args(["identity", "show", cid, "--json"]).output().unwrap();
    let again: J = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["members"].as_array().map(Vec::len), Some(truth.len()), "the confirmed merge stands");
    let v = bin().arg("--config").arg(&cfg_path).args(["verify", "--json", "--no-values", "--lake"]).arg(&lake).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert_eq!(report["lake_reviews"]["differing"], 0, "after the decision: {}", report["lake_reviews"]);

    split_and_relink(&p, &cfg_path, &manifest, &mut h, &hq_db, &lake, cid).await;
    split_site_merge(&p, &cfg_path, &manifest, &mut h, &lake).await;
    status_sees_each_clinic(&cfg_path, &mut h).await;

    let mut a = admin(HQ_PORT, None).await;
    a.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
    for port in PORTS {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{}`", p.database)).await.unwrap();
    }
}

/// The uuids of `table`'s rows whose `col` is the person `person` at `site`'s own database:
/// the clinic's truth of whose they are.
async fn site_rows(database: &str, site: &str, table: &str, col: &str, person: &str) -> std::collections::BTreeSet<String> {
    let port = PORTS[SITES.iter().position(|s| *s == site).unwrap()];
    let mut c = admin(port, Some(database)).await;
    c.exec::<String, _, _>(format!("SELECT t.uuid FROM {table} t JOIN person p ON p.person_id = t.{col} WHERE p.uuid = ?"), (person,)).await.unwrap().into_iter().collect()
}

/// The uuids of `table`'s rows on HQ person `person`.
async fn hq_rows(h: &mut mysql_async::Conn, table: &str, col: &str, person: &str) -> std::collections::BTreeSet<String> {
    h.exec::<String, _, _>(format!("SELECT t.uuid FROM {table} t JOIN person p ON p.person_id = t.{col} WHERE p.uuid = ?"), (person,)).await.unwrap().into_iter().collect()
}

/// Issue #23 §4: a data manager splits a record off a merged person. At HQ and in the lake
/// its obs and encounters (by its clinic's own database) go back to it, the rest stay; the
/// record is a patient again. A new identifier both sides then share opens a review instead
/// of merging them again. HQ and the lake agree, value for value.
async fn split_and_relink(
    p: &Pipeline,
    cfg_path: &std::path::Path,
    manifest: &omrs_simulate::manifest::Manifest,
    h: &mut mysql_async::Conn,
    hq_db: &str,
    lake: &std::path::Path,
    confirmed: &str,
) {
    // A record joined by an identifier that no clinic merged and that merged none itself, in a
    // person with obs at the record's clinic and elsewhere.
    let site_merged: std::collections::BTreeSet<&str> =
        manifest.humans.iter().flat_map(|hm| &hm.records).filter_map(|r| r.merged_into.as_deref().map(|w| [w, r.person_uuid.as_str()])).flatten().collect();
    let candidates: Vec<(String, String, String)> = h
        .query("SELECT m.loser_uuid, m.winner_uuid, m.review_id FROM omrs_sync_merge m WHERE m.reason = 'identifier' AND m.applied = 1 ORDER BY m.loser_uuid")
        .await
        .unwrap();
    let site_of: std::collections::HashMap<&str, &str> = manifest.humans.iter().flat_map(|hm| &hm.records).map(|r| (r.person_uuid.as_str(), r.site.as_str())).collect();
    let mut pick = None;
    for (loser, winner, review) in candidates {
        let members: Vec<String> = h.exec("SELECT loser_uuid FROM omrs_sync_merge WHERE winner_uuid = ?", (winner.as_str(),)).await.unwrap();
        if review == confirmed || site_merged.contains(loser.as_str()) || members.iter().any(|m| site_merged.contains(m.as_str())) || site_merged.contains(winner.as_str()) {
            continue;
        }
        let Some(site) = site_of.get(loser.as_str()) else { continue };
        let own = site_rows(&p.database, site, "obs", "person_id", &loser).await;
        let all = hq_rows(h, "obs", "person_id", &winner).await;
        if !own.is_empty() && all.len() > own.len() {
            pick = Some((loser, winner, site.to_string()));
            break;
        }
    }
    let (r, w, site) = pick.expect("a record merged on an identifier, with obs of its own and others'");
    let (own_obs, own_enc) = (site_rows(&p.database, &site, "obs", "person_id", &r).await, site_rows(&p.database, &site, "encounter", "patient_id", &r).await);
    let (all_obs, all_enc) = (hq_rows(h, "obs", "person_id", &w).await, hq_rows(h, "encounter", "patient_id", &w).await);
    assert!(own_obs.is_subset(&all_obs) && own_enc.is_subset(&all_enc), "before the split, {r}'s rows are on {w}");

    let out = bin()
        .arg("--config")
        .arg(cfg_path)
        .args(["identity", "split", &r, "--note", "two people: the clerk copied the wrong card", "--by", "dm-test", "--wait", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "identity split: {}", String::from_utf8_lossy(&out.stderr));
    p.run(cfg_path, &["transform", "--until-idle", "--metrics-port", "0"]);
    // The HQ sink is SIGKILLed in the middle of applying the split: inside the split's
    // transaction it waits on the record's person row, which the test holds locked. Run
    // again, it applies the split once, whole.
    let mut lock = hq(hq_db).await;
    lock.query_drop("START TRANSACTION").await.unwrap();
    lock.exec_drop("SELECT person_id FROM person WHERE uuid = ? FOR UPDATE", (r.as_str(),)).await.unwrap();
    let mut sink = bin()
        .arg("--config")
        .arg(cfg_path)
        .args(["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(120, "the HQ sink to wait on the locked person row inside the split", || {
        assert!(sink.try_wait().unwrap().is_none(), "the HQ sink exited before applying the split");
        (block_on(count(h, "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'")) > 0).then_some(())
    });
    kill9(&mut sink);
    lock.query_drop("ROLLBACK").await.unwrap();
    assert_eq!(hq_rows(h, "obs", "person_id", &r).await, std::collections::BTreeSet::new(), "nothing of the killed split was committed");
    p.run(cfg_path, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    p.run(cfg_path, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);

    // HQ: the record is a patient of its own again, with exactly its clinic's rows.
    let voided: Vec<(i64, i64)> =
        h.exec("SELECT p.voided, pa.voided FROM person p JOIN patient pa ON pa.patient_id = p.person_id WHERE p.uuid = ?", (r.as_str(),)).await.unwrap();
    assert_eq!(voided, vec![(0, 0)], "{r} is not voided any more");
    assert_eq!(hq_rows(h, "obs", "person_id", &r).await, own_obs, "{r}'s obs, by its clinic");
    assert_eq!(hq_rows(h, "encounter", "patient_id", &r).await, own_enc, "{r}'s encounters, by its clinic");
    assert_eq!(hq_rows(h, "obs", "person_id", &w).await, &all_obs - &own_obs, "the others' obs stay on {w}");
    assert_eq!(hq_rows(h, "encounter", "patient_id", &w).await, &all_enc - &own_enc);
    let merged_away = count(h, &format!("SELECT COUNT(*) FROM omrs_sync_merge WHERE loser_uuid = '{r}'")).await;
    assert_eq!(merged_away, 0, "{r} is nobody's loser");
    // The lake's current state says the same.
    assert_eq!(lake_set(cfg_path, lake, "obs", "person_id_uuid", &r), own_obs, "the lake: {r}'s obs");
    assert_eq!(lake_set(cfg_path, lake, "obs", "person_id_uuid", &w), &all_obs - &own_obs, "the lake: the others' obs");

    // Both clinics add the same new identifier to their record: the split holds, a review opens.
    let cfg = omrs_core::config::Config::load(cfg_path).unwrap();
    let type_uuid = &cfg.identity.identifiers[0].identifier_type_uuid;
    let value = format!("{}", 900_000_000 + (std::process::id() % 99_999));
    for (person, site) in [(r.as_str(), site.as_str()), (w.as_str(), site_of_any(manifest, &w))] {
        let port = PORTS[SITES.iter().position(|s| *s == site).unwrap()];
        let mut c = admin(port, Some(&p.database)).await;
        c.exec_drop(
            "INSERT INTO patient_identifier (patient_id, identifier, identifier_type, preferred, location_id, creator, date_created, voided, uuid)
             SELECT p.person_id, ?, t.patient_identifier_type_id, 0, (SELECT MIN(location_id) FROM location), 1, NOW(), 0, UUID()
               FROM person p, patient_identifier_type t WHERE p.uuid = ? AND t.uuid = ?",
            (value.as_str(), person, type_uuid.as_str()),
        )
        .await
        .unwrap();
    }
    p.ingest(cfg_path, &SITES, true);
    p.run(cfg_path, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(cfg_path, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    p.run(cfg_path, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);
    let mut pair = [r.clone(), w.clone()];
    pair.sort();
    let shared: Vec<(String, String)> = h.query("SELECT status, records FROM omrs_sync_identity_review WHERE reason = 'identifier_shared'").await.unwrap();
    assert_eq!(shared, vec![("open".to_string(), serde_json::to_string(&pair).unwrap())], "the shared identifier is a review");
    assert_eq!(count(h, &format!("SELECT COUNT(*) FROM omrs_sync_merge WHERE loser_uuid = '{r}'")).await, 0, "{r} was not merged again");
    assert_eq!(hq_rows(h, "obs", "person_id", &r).await, own_obs);
    let v = bin().arg("--config").arg(cfg_path).args(["verify", "--json", "--lake"]).arg(lake).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert!(v.status.success() && report["ok"] == J::Bool(true), "verify after the split: {}\n{}", String::from_utf8_lossy(&v.stderr), serde_json::to_string_pretty(&report).unwrap_or_default());
}

/// The uuids of the obs in the encounters with `encounters` uuids, at a clinic.
async fn obs_of_encounters(c: &mut mysql_async::Conn, encounters: &[String]) -> std::collections::BTreeSet<String> {
    let marks = vec!["?"; encounters.len()].join(",");
    let sql = format!("SELECT o.uuid FROM obs o JOIN encounter e ON e.encounter_id = o.encounter_id WHERE e.uuid IN ({marks})");
    c.exec::<String, _, _>(sql, encounters.to_vec()).await.unwrap().into_iter().collect()
}

/// The uuids of `sql`'s first column at HQ, for the one parameter given.
async fn hq_set(h: &mut mysql_async::Conn, sql: &str, person: &str) -> std::collections::BTreeSet<String> {
    h.exec::<String, _, _>(sql, (person,)).await.unwrap().into_iter().collect()
}

/// The uuids of the lake's current `table` rows whose `column` is `person`.
fn lake_set(cfg_path: &std::path::Path, lake: &std::path::Path, table: &str, column: &str, person: &str) -> std::collections::BTreeSet<String> {
    let q = bin()
        .arg("--config")
        .arg(cfg_path)
        .args(["query", "--lake"])
        .arg(lake)
        .args(["--format", "json", &format!("SELECT uuid FROM current.{table} WHERE {column} = '{person}'")])
        .output()
        .unwrap();
    let rows: J = serde_json::from_slice(&q.stdout).unwrap_or(J::Null);
    assert!(q.status.success() && rows.is_array(), "query: {}", String::from_utf8_lossy(&q.stderr));
    rows.as_array().map(|a| a.iter().filter_map(|x| x["uuid"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Issue #23 §4: a clinic's own merge (its `person_merge_log`) split at HQ. The visits and
/// encounters the simulator moved in that merge, and the obs in them (by the clinic's own
/// database), go back to the loser at HQ and in the lake; the loser is a patient again. Later
/// changes at the clinic, which still has them as one patient (an obs of a moved encounter
/// voided, a new obs added to one), land on the loser too. HQ and the lake agree.
async fn split_site_merge(p: &Pipeline, cfg_path: &std::path::Path, manifest: &omrs_simulate::manifest::Manifest, h: &mut mysql_async::Conn, lake: &std::path::Path) {
    // A clinic's merge that moved encounters, of a loser that merged no other record itself.
    let winners: std::collections::BTreeSet<&str> = manifest.site_merges.iter().map(|m| m.winner_uuid.as_str()).collect();
    let m = manifest
        .site_merges
        .iter()
        .find(|m| !m.moved_encounters.is_empty() && !winners.contains(m.loser_uuid.as_str()))
        .expect("a clinic's merge that moved encounters");
    let (l, w) = (m.loser_uuid.as_str(), m.winner_uuid.as_str());
    let port = PORTS[SITES.iter().position(|s| *s == m.site).unwrap()];
    let mut site = admin(port, Some(&p.database)).await;
    let own_obs = obs_of_encounters(&mut site, &m.moved_encounters).await;
    assert!(!own_obs.is_empty(), "the moved encounters hold obs");
    let own_enc: std::collections::BTreeSet<String> = m.moved_encounters.iter().cloned().collect();
    let own_visits: std::collections::BTreeSet<String> = m.moved_visits.iter().cloned().collect();
    // At the clinic they are all the winner's now.
    assert_eq!(site_rows(&p.database, &m.site, "obs", "person_id", w).await.intersection(&own_obs).count(), own_obs.len(), "{l}'s obs are {w}'s at the clinic");

    // HQ has them on the merged person's survivor; the record not surviving leaves.
    let survivor: Option<String> = h.exec_first("SELECT winner_uuid FROM omrs_sync_merge WHERE loser_uuid = ?", (l,)).await.unwrap();
    let survivor = survivor.unwrap_or_else(|| l.to_string());
    let enc_sql = "SELECT t.uuid FROM encounter t JOIN person p ON p.person_id = t.patient_id WHERE p.uuid = ?";
    assert!(own_enc.is_subset(&hq_set(h, enc_sql, &survivor).await), "before the split, {l}'s encounters are on {survivor}");
    // The loser leaves; when HQ's survivor is the loser itself, it stays and the rest leave.
    let mut split = vec!["identity", "split", l];
    if survivor == l {
        split.extend(["--keep", l]);
    }
    let out = bin()
        .arg("--config")
        .arg(cfg_path)
        .args(&split)
        .args(["--note", "not the same child: the clinic merged twins", "--by", "dm-test", "--wait", "0"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "identity split of a clinic's merge: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains(&format!("{} merged them itself", m.site)), "the split says the clinic still has one patient: {said}");
    let run_all = || {
        p.run(cfg_path, &["transform", "--until-idle", "--metrics-port", "0"]);
        p.run(cfg_path, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
        p.run(cfg_path, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);
    };
    run_all();

    let obs_sql = "SELECT t.uuid FROM obs t JOIN person p ON p.person_id = t.person_id WHERE p.uuid = ?";
    let visit_sql = "SELECT t.uuid FROM visit t JOIN person p ON p.person_id = t.patient_id WHERE p.uuid = ?";
    let voided: Vec<(i64, i64)> = h.exec("SELECT p.voided, pa.voided FROM person p JOIN patient pa ON pa.patient_id = p.person_id WHERE p.uuid = ?", (l,)).await.unwrap();
    assert_eq!(voided, vec![(0, 0)], "{l} is a patient again at HQ");
    assert_eq!(hq_set(h, enc_sql, l).await, own_enc, "HQ: {l}'s encounters, as the simulator moved them");
    assert_eq!(hq_set(h, visit_sql, l).await, own_visits, "HQ: {l}'s visits");
    assert_eq!(hq_set(h, obs_sql, l).await, own_obs, "HQ: {l}'s obs, by its clinic's encounters");
    let w_side: Option<String> = h.exec_first("SELECT winner_uuid FROM omrs_sync_merge WHERE loser_uuid = ?", (w,)).await.unwrap();
    let w_side = w_side.unwrap_or_else(|| w.to_string());
    assert!(hq_set(h, obs_sql, &w_side).await.is_disjoint(&own_obs), "none of {l}'s obs stay on {w_side}");
    assert_eq!(lake_set(cfg_path, lake, "obs", "person_id_uuid", l), own_obs, "the lake: {l}'s obs");
    assert_eq!(lake_set(cfg_path, lake, "encounter", "patient_id_uuid", l), own_enc, "the lake: {l}'s encounters");

    // The clinic goes on with its merged patient: an obs of a moved encounter is voided, a new
    // one is added to that encounter (on the winner, as the clinic sees it).
    let first = m.moved_encounters[0].as_str();
    site.exec_drop("UPDATE obs o JOIN encounter e ON e.encounter_id = o.encounter_id SET o.voided = 1, o.voided_by = 1, o.date_voided = NOW(), o.void_reason = 'entered in error' WHERE e.uuid = ? AND o.voided = 0 ORDER BY o.obs_id LIMIT 1", (first,))
        .await
        .unwrap();
    let new_obs = format!("5e1f0a00-0000-4000-8000-{:012}", std::process::id());
    site.exec_drop(
        "INSERT INTO obs (person_id, concept_id, encounter_id, obs_datetime, location_id, value_text, creator, date_created, voided, uuid)
         SELECT e.patient_id, o.concept_id, e.encounter_id, e.encounter_datetime, e.location_id, 'added after the split', 1, NOW(), 0, ?
           FROM encounter e JOIN obs o ON o.encounter_id = e.encounter_id WHERE e.uuid = ? ORDER BY o.obs_id LIMIT 1",
        (new_obs.as_str(), first),
    )
    .await
    .unwrap();
    p.ingest(cfg_path, &[m.site.as_str()], true);
    run_all();
    let mut expected = own_obs.clone();
    expected.insert(new_obs.clone());
    assert_eq!(obs_of_encounters(&mut site, &m.moved_encounters).await, expected, "the clinic's encounters hold the new obs");
    assert_eq!(hq_set(h, obs_sql, l).await, expected, "HQ: the clinic's later changes land on {l}");
    assert_eq!(lake_set(cfg_path, lake, "obs", "person_id_uuid", l), expected, "the lake: the clinic's later changes land on {l}");
    let v = bin().arg("--config").arg(cfg_path).args(["verify", "--json", "--lake"]).arg(lake).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert!(v.status.success() && report["ok"] == J::Bool(true), "verify after splitting a clinic's merge: {}\n{}", String::from_utf8_lossy(&v.stderr), serde_json::to_string_pretty(&report).unwrap_or_default());
}

/// The clinic of a record (the survivor's own, for a survivor).
fn site_of_any<'m>(manifest: &'m omrs_simulate::manifest::Manifest, person: &str) -> &'m str {
    manifest.humans.iter().flat_map(|hm| &hm.records).find(|r| r.person_uuid == person).map(|r| r.site.as_str()).unwrap_or("site-a")
}

/// Issue #27 §3: `omrs-stream status` with one clinic's agent running and four stopped for
/// longer than the idle timeout: the running one live, the others offline, each with what its
/// topic holds, nothing left for the transform, and HQ's open reviews per clinic.
async fn status_sees_each_clinic(cfg_path: &std::path::Path, h: &mut mysql_async::Conn) {
    let cfg = omrs_core::config::Config::load(cfg_path).unwrap();
    let mut agent = bin()
        .arg("--config")
        .arg(cfg_path)
        .args(["ingest", "--site", "site-a", "--quiet", "--metrics-port", "0"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = || {
        let out = bin().arg("--config").arg(cfg_path).args(["status", "--json"]).output().unwrap();
        let s: J = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), s)
    };
    let state = |s: &J, site: &str| s["sites"].as_array().unwrap().iter().find(|r| r["site"] == site).cloned().unwrap();
    // The stopped agents are offline once the idle timeout has passed since their last word.
    let (code, s) = wait_for(60, "site-a live and the others offline in omrs-stream status", || {
        let (code, s) = status();
        let offline = SITES[1..].iter().all(|site| state(&s, site)["state"] == "offline");
        (state(&s, "site-a")["state"] == "live" && offline).then_some((code, s))
    });
    kill9(&mut agent);
    assert_eq!(code, Some(1), "clinics offline: status exits 1");
    let open: std::collections::BTreeMap<String, i64> =
        h.query::<(String, i64), _>("SELECT site, COUNT(*) FROM omrs_sync_identity_review WHERE status = 'open' GROUP BY site").await.unwrap().into_iter().collect();
    let reader: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    for site in &SITES[1..] {
        let r = state(&s, site);
        assert_eq!(r["state"], "offline", "{r}");
        let topic = format!("{}omrs.cdc.{site}", cfg.kafka.topic_prefix);
        let (_, end) = rdkafka::consumer::Consumer::fetch_watermarks(&reader, &topic, 0, std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(r["captured"].as_i64(), Some(end), "{r}");
        assert_eq!(r["transform_behind"].as_i64(), Some(0), "{r}");
        assert_eq!(r["open_reviews"].as_i64(), Some(open.get(*site).copied().unwrap_or(0)), "{r}");
        assert!(r["last_heard_age_s"].as_i64().unwrap() > cfg.transform.idle_timeout_s as i64, "{r}");
        assert!(s["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().starts_with(&format!("{site} offline"))), "{s}");
    }
    assert_eq!(state(&s, "site-a")["open_reviews"].as_i64(), Some(open.get("site-a").copied().unwrap_or(0)));
    let text = bin().arg("--config").arg(cfg_path).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.lines().any(|l| l.starts_with("site-b") && l.contains("offline")), "{text}");

    // `verify --site`: one clinic against HQ, the others not needed.
    let v = bin().arg("--config").arg(cfg_path).args(["verify", "--site", "site-b", "--no-lake", "--json"]).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert!(v.status.success() && report["ok"] == J::Bool(true), "verify --site: {}\n{report}", String::from_utf8_lossy(&v.stderr));
    let obs = report["tables"].as_array().unwrap().iter().find(|t| t["table"] == "obs").unwrap();
    assert_eq!(obs["site_rows"].as_object().unwrap().keys().collect::<Vec<_>>(), ["site-b"], "{obs}");
    let site_obs = count(&mut admin(PORTS[1], Some(&cfg.sites[1].database.database)).await, "SELECT COUNT(*) FROM obs").await;
    assert_eq!(obs["site_rows"]["site-b"].as_i64(), Some(site_obs));
    assert!(report["scope"].as_str().is_some_and(|s| s.contains("site-b")), "{report}");
    let bad = bin().arg("--config").arg(cfg_path).args(["verify", "--site", "site-z"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--site site-z: no such site"), "{}", String::from_utf8_lossy(&bad.stderr));
}

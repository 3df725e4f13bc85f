use super::*;

fn model(tables: &[(&str, &[&str], &[&str])]) -> Model {
    let mut m = Model { database: "openmrs".into(), ..Default::default() };
    for (name, cols, pk) in tables {
        let columns = cols.iter().map(|c| ColumnInfo { name: c.to_string(), column_type: "int(11)".into(), ..Default::default() }).collect();
        m.tables.insert(name.to_string(), Arc::new(rebuilt(name, columns, pk.iter().map(|s| s.to_string()).collect(), None)));
    }
    reorder(&mut m);
    m
}

fn cols(m: &Model, t: &str) -> Vec<String> {
    m.tables[t].columns.iter().map(|c| c.name.clone()).collect()
}

const OURS: Scope<'static> = Scope { db: "openmrs", default: "openmrs" };

fn all(_: &str) -> bool {
    true
}

fn pos(p: u64) -> Position {
    Position { file: "binlog.000001".into(), pos: p, gtid: None, gtid_set: None }
}

#[test]
fn alter_table_follows_columns_and_their_places() {
    let mut m = model(&[("person_name", &["person_name_id", "given_name", "family_name"], &["person_name_id"])]);
    let r = apply_ddl(&mut m, OURS, "ALTER TABLE person_name ADD COLUMN nickname VARCHAR(50) NULL AFTER given_name", &all).unwrap();
    assert_eq!(r, Applied::Tables(vec!["person_name".into()]));
    assert_eq!(cols(&m, "person_name"), ["person_name_id", "given_name", "nickname", "family_name"]);
    assert_eq!(m.tables["person_name"].columns[2].column_type, "varchar(50)");
    apply_ddl(&mut m, OURS, "ALTER TABLE `openmrs`.`person_name` ADD `title` varchar(10) FIRST, DROP COLUMN family_name", &all).unwrap();
    assert_eq!(cols(&m, "person_name"), ["title", "person_name_id", "given_name", "nickname"]);
    apply_ddl(&mut m, OURS, "ALTER TABLE person_name CHANGE nickname alias VARCHAR(80), MODIFY title VARCHAR(20) AFTER alias", &all).unwrap();
    assert_eq!(cols(&m, "person_name"), ["person_name_id", "given_name", "alias", "title"]);
    apply_ddl(&mut m, OURS, "ALTER TABLE person_name RENAME COLUMN alias TO other_name", &all).unwrap();
    assert_eq!(cols(&m, "person_name"), ["person_name_id", "given_name", "other_name", "title"]);
    assert_eq!(m.tables["person_name"].pk, ["person_name_id"]);
    // An index changes no column; another schema's table is not ours.
    assert_eq!(apply_ddl(&mut m, OURS, "ALTER TABLE person_name ADD INDEX i_given (given_name)", &all).unwrap(), Applied::Tables(vec!["person_name".into()]));
    assert_eq!(cols(&m, "person_name"), ["person_name_id", "given_name", "other_name", "title"]);
    assert_eq!(apply_ddl(&mut m, OURS, "ALTER TABLE other_db.person_name DROP COLUMN title", &all).unwrap(), Applied::Nothing);
    assert_eq!(apply_ddl(&mut m, OURS, "CREATE INDEX i2 ON person_name (title)", &all).unwrap(), Applied::Tables(vec!["person_name".into()]));
    assert_eq!(apply_ddl(&mut m, OURS, "CREATE INDEX i3 ON other_db.person_name (title)", &all).unwrap(), Applied::Nothing);
    // Run from another default schema, an unqualified name is that schema's table.
    let elsewhere = Scope { db: "openmrs", default: "reports" };
    assert_eq!(apply_ddl(&mut m, elsewhere, "ALTER TABLE person_name DROP COLUMN title", &all).unwrap(), Applied::Nothing);
    apply_ddl(&mut m, elsewhere, "ALTER TABLE openmrs.person_name DROP COLUMN title", &all).unwrap();
    assert_eq!(cols(&m, "person_name"), ["person_name_id", "given_name", "other_name"]);
    apply_ddl(&mut m, OURS, "ALTER TABLE person_name ADD COLUMN title varchar(20)", &all).unwrap();
    // A column it does not know is an error, not a guess.
    assert!(apply_ddl(&mut m, OURS, "ALTER TABLE person_name DROP COLUMN nope", &all).is_err());
    assert!(apply_ddl(&mut m, OURS, "ALTER TABLE person_name FROBNICATE", &all).is_err());
}

#[test]
fn a_module_table_is_created_with_its_keys_renamed_and_dropped() {
    let mut m = model(&[("patient", &["patient_id"], &["patient_id"]), ("encounter", &["encounter_id", "patient_id"], &["encounter_id"])]);
    let ddl = "CREATE TABLE `hiv_care` (
        `hiv_care_id` int(11) NOT NULL AUTO_INCREMENT,
        `patient_id` int(11) NOT NULL,
        `encounter_id` int(11) DEFAULT NULL,
        `regimen` enum('first','second') DEFAULT NULL,
        `uuid` char(38) NOT NULL,
        PRIMARY KEY (`hiv_care_id`),
        CONSTRAINT `hiv_care_patient` FOREIGN KEY (`patient_id`) REFERENCES `patient` (`patient_id`),
        CONSTRAINT `hiv_care_encounter` FOREIGN KEY (`encounter_id`) REFERENCES `encounter` (`encounter_id`)
      ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";
    assert_eq!(apply_ddl(&mut m, OURS, ddl, &all).unwrap(), Applied::Tables(vec!["hiv_care".into()]));
    let t = &m.tables["hiv_care"];
    assert_eq!(cols(&m, "hiv_care"), ["hiv_care_id", "patient_id", "encounter_id", "regimen", "uuid"]);
    assert_eq!(t.pk, ["hiv_care_id"]);
    assert!(t.has_uuid);
    assert_eq!(t.enums["regimen"], ["first", "second"]);
    assert_eq!(t.fks.iter().map(|f| (f.column.as_str(), f.ref_table.as_str())).collect::<Vec<_>>(), [("patient_id", "patient"), ("encounter_id", "encounter")]);
    let order = &m.order;
    assert!(order.iter().position(|t| t == "hiv_care") > order.iter().position(|t| t == "encounter"), "parents first: {order:?}");
    // Not captured: not in the model.
    apply_ddl(&mut m, OURS, "CREATE TABLE scratch (a int)", &|t| t != "scratch").unwrap();
    assert!(!m.tables.contains_key("scratch"));
    apply_ddl(&mut m, OURS, "CREATE TABLE hiv_care_copy LIKE hiv_care", &all).unwrap();
    assert_eq!(cols(&m, "hiv_care_copy"), cols(&m, "hiv_care"));
    assert_eq!(apply_ddl(&mut m, OURS, "RENAME TABLE hiv_care_copy TO hiv_care_old", &all).unwrap(), Applied::Tables(vec!["hiv_care_copy".into(), "hiv_care_old".into()]));
    assert!(!m.tables.contains_key("hiv_care_copy"));
    apply_ddl(&mut m, OURS, "DROP TABLE IF EXISTS hiv_care_old", &all).unwrap();
    assert!(!m.tables.contains_key("hiv_care_old"));
}

#[test]
fn history_gives_each_table_as_the_binlog_knew_it_at_the_checkpoint() {
    // information_schema now: person_name has a column added after the checkpoint.
    let mut now = model(&[("person_name", &["person_name_id", "given_name", "nickname"], &["person_name_id"]), ("obs", &["obs_id"], &["obs_id"])]);
    let base = model(&[("person_name", &["person_name_id", "given_name"], &["person_name_id"]), ("obs", &["obs_id"], &["obs_id"]), ("gone", &["id"], &["id"])]);
    let mut h = History::default();
    // An earlier snapshot's record is ignored: it is older than the latest base.
    let stale = TableSchema::of(&model(&[("obs", &["x"], &[])]).tables["obs"], &pos(10), None);
    let (k, v) = stale.record();
    h.learn(&k, &v).unwrap();
    for (k, v) in base_records(&base, &pos(100)) {
        h.learn(&k, &v).unwrap();
    }
    // Then `gone` was dropped before the checkpoint.
    let dropped = TableSchema::dropped("gone", &pos(200), "DROP TABLE gone");
    let (k, v) = dropped.record();
    h.learn(&k, &v).unwrap();
    h.learn(b"site-a", b"{\"phase\":\"streaming\"}").unwrap();
    h.apply_to(&mut now);
    assert_eq!(cols(&now, "person_name"), ["person_name_id", "given_name"], "the checkpoint's columns, not information_schema's");
    assert_eq!(cols(&now, "obs"), ["obs_id"]);
    assert!(!now.tables.contains_key("gone"));
    assert!(h.learn(b"schema:obs", b"not json").is_err());
}

#[test]
fn settle_prefers_information_schema_only_when_it_names_the_same_columns() {
    let mut m = model(&[("person_name", &["person_name_id", "given_name"], &["person_name_id"])]);
    let ddl = "ALTER TABLE person_name ADD COLUMN nickname VARCHAR(50)";
    let Applied::Tables(changed) = apply_ddl(&mut m, OURS, ddl, &all).unwrap() else { panic!() };
    // The server is already two DDLs ahead.
    let ahead = model(&[("person_name", &["person_name_id", "given_name", "nickname", "title"], &["person_name_id"])]);
    let rec = settle(&mut m, &ahead, &changed, &pos(300), ddl);
    assert_eq!(cols(&m, "person_name"), ["person_name_id", "given_name", "nickname"]);
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].shape.columns.len(), 3);
    // In step: information_schema's model (its column types) is taken.
    let mut m2 = model(&[("person_name", &["person_name_id", "given_name"], &["person_name_id"])]);
    apply_ddl(&mut m2, OURS, ddl, &all).unwrap();
    let mut same = model(&[("person_name", &["person_name_id", "given_name", "nickname"], &["person_name_id"])]);
    Arc::make_mut(same.tables.get_mut("person_name").unwrap()).columns[2].column_type = "varchar(50) from information_schema".into();
    settle(&mut m2, &same, &changed, &pos(300), ddl);
    assert_eq!(m2.tables["person_name"].columns[2].column_type, "varchar(50) from information_schema");
}

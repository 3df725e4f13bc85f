//! Config loading: the shipped default is valid, and every kind of mistake names the file and
//! the key.

use std::path::{Path, PathBuf};

use omrs_core::config::{Config, TopicsFile};

fn root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..")
}

fn default_text() -> String {
    std::fs::read_to_string(root().join("omrs-stream.toml")).unwrap()
}

fn err_of(text: &str) -> String {
    Config::parse(text, Path::new("test.toml")).unwrap_err().to_string()
}

#[test]
fn the_shipped_default_describes_the_dev_services() {
    let cfg = Config::load(&root().join("omrs-stream.toml")).unwrap();
    assert_eq!(cfg.site_names(), vec!["site-a", "site-b", "site-c"]);
    assert_eq!(cfg.site("site-b").unwrap().database.port, 3312);
    assert_eq!(cfg.hq.database.port, 3310);
    assert_eq!(cfg.identity.identifiers.len(), 1);
    assert!(cfg.ingest.scrub.contains(&"users.password".to_string()));
    let topics = TopicsFile::load(&root().join("topics.toml")).unwrap();
    let names: Vec<String> =
        topics.resolve(&cfg.site_names(), "").into_iter().map(|t| t.name).collect();
    for want in [
        "omrs.cdc.site-a",
        "omrs.cdc.site-b",
        "omrs.cdc.site-c",
        "omrs.hq.changes",
        "omrs.transform.state",
        "omrs.dlq",
        "omrs.ingest.offsets.site-a",
        "omrs.ingest.offsets.site-c",
    ] {
        assert!(names.contains(&want.to_string()), "{want} missing from {names:?}");
    }
}

#[test]
fn an_unknown_key_is_named() {
    let text = default_text().replace("[metrics]\n", "[metrics]\nlisten_port = 1\n");
    let err = err_of(&text);
    assert!(err.starts_with("test.toml: metrics.listen_port: unknown field `listen_port`, expected `listen`"), "{err}");
}

#[test]
fn an_unknown_key_inside_a_site_is_named_with_its_index() {
    let text = default_text().replacen("priority = 2\n", "priority = 2\nprioritty = 2\n", 1);
    let err = err_of(&text);
    assert!(err.contains("sites[1].prioritty: unknown field `prioritty`"), "{err}");
}

#[test]
fn a_missing_site_database_is_named() {
    let text = default_text().replacen(
        "[sites.database]\nhost = \"127.0.0.1\"\nport = 3312\nuser = \"cdc\"\npassword = \"${OMRS_CDC_PASSWORD:-cdc}\"\ndatabase = \"openmrs\"\n",
        "",
        1,
    );
    assert_ne!(text, default_text(), "fixture edit did not apply");
    let err = err_of(&text);
    assert!(err.contains("sites[1]") && err.contains("missing field `database`"), "{err}");
}

#[test]
fn a_site_time_zone_is_read_and_a_wrong_one_named() {
    let text = default_text().replacen("priority = 2\n", "priority = 2\ntime_zone = \"Africa/Nairobi\"\n", 1);
    let cfg = Config::parse(&text, Path::new("test.toml")).unwrap();
    assert_eq!(cfg.site("site-b").unwrap().zone(), omrs_core::zone::Zone::parse("Africa/Nairobi").unwrap());
    assert!(cfg.site("site-a").unwrap().zone().is_utc(), "no time_zone: UTC");
    let text = default_text().replacen("priority = 2\n", "priority = 2\ntime_zone = \"+3\"\n", 1);
    assert!(Config::parse(&text, Path::new("test.toml")).unwrap().site("site-b").unwrap().zone().offset_now() == "+03:00");
    let text = default_text().replacen("priority = 2\n", "priority = 2\ntime_zone = \"Nairobi\"\n", 1);
    let err = err_of(&text);
    assert!(err.contains("test.toml: sites[1].time_zone: `Nairobi` is neither an offset like +03:00 nor a known IANA time zone"), "{err}");
}

#[test]
fn a_bad_port_is_named() {
    let text = default_text().replacen("port = 3313", "port = 99999", 1);
    let err = err_of(&text);
    assert!(err.contains("sites[2].database.port"), "{err}");

    let text = default_text().replacen("port = 3310", "port = 0", 1);
    let err = err_of(&text);
    assert!(err.contains("hq.database.port: 0 is not a usable TCP port"), "{err}");

    let text = default_text().replacen("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:70000\"", 1);
    let err = err_of(&text);
    assert!(err.contains("metrics.listen"), "{err}");

    let text = default_text().replacen("${OMRS_KAFKA:-127.0.0.1:9092}", "localhost:0", 1);
    let err = err_of(&text);
    assert!(err.contains("kafka.bootstrap_servers"), "{err}");
}

#[test]
fn a_missing_env_variable_is_named_with_its_key() {
    let text = default_text().replacen(
        "password = \"${OMRS_HQ_PASSWORD:-hq}\"",
        "password = \"${OMRS_TEST_SURELY_UNSET_HQ_PW}\"",
        1,
    );
    let err = err_of(&text);
    assert!(
        err.contains("hq.database.password") && err.contains("`OMRS_TEST_SURELY_UNSET_HQ_PW` is not set"),
        "{err}"
    );
}

#[test]
fn env_values_are_substituted() {
    std::env::set_var("OMRS_TEST_HQ_PW_SET", "from-env");
    let text = default_text().replacen("${OMRS_HQ_PASSWORD:-hq}", "${OMRS_TEST_HQ_PW_SET}", 1);
    let cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(cfg.hq.database.password, "from-env");
}

#[test]
fn semantic_errors_are_named() {
    let dup = default_text().replacen("name = \"site-b\"", "name = \"site-a\"", 1);
    assert!(err_of(&dup).contains("sites[1].name: site `site-a` is configured twice"));
    let bad = default_text().replacen("name = \"site-c\"", "name = \"Site C\"", 1);
    assert!(err_of(&bad).contains("sites[2].name"));
    let uuid = default_text().replacen("c5b2e8a4-1f7d-4e5b-9a61-6f1e0a1d2b3c", "national-id", 1);
    assert!(err_of(&uuid).contains("identity.identifiers[0].identifier_type_uuid"));
    let syntax = "[kafka\n";
    assert!(err_of(syntax).contains("(syntax)"));
}

#[test]
fn topics_file_errors_are_named() {
    let text = "[[topics]]\nname = \"omrs.dlq\"\npartitions = 0\nreplication_factor = 1\n";
    let err = TopicsFile::parse(text, Path::new("topics.toml")).unwrap_err().to_string();
    assert_eq!(err, "topics.toml: topics[0].partitions: must be at least 1");
    let text = "[[topics]]\nname = \"omrs.dlq\"\npartitions = 1\nreplication_factor = 1\nretention = 1\n";
    let err = TopicsFile::parse(text, Path::new("topics.toml")).unwrap_err().to_string();
    assert!(err.ends_with("topics[0].retention: unknown field `retention`, expected one of `name`, `description`, `partitions`, `replication_factor`, `config`"), "{err}");
}

#[test]
fn secrets_come_from_files_and_are_never_printed() {
    let dir = std::env::temp_dir().join(format!("omrs-config-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hq_pw = dir.join("hq.password");
    let kafka_pw = dir.join("kafka.password");
    std::fs::write(&hq_pw, "s3cret-hq\n").unwrap();
    std::fs::write(&kafka_pw, "s3cret-kafka\r\n").unwrap();
    let text = default_text()
        .replacen("password = \"${OMRS_HQ_PASSWORD:-hq}\"", &format!("password_file = \"{}\"", hq_pw.display()), 1)
        .replacen("[kafka]\n", &format!("[kafka]\nsasl_password_file = \"{}\"\n", kafka_pw.display()), 1);
    let cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
    assert_eq!(cfg.hq.database.password, "s3cret-hq");
    assert_eq!(cfg.kafka.sasl_password.as_deref(), Some("s3cret-kafka"));
    let printed = format!("{cfg:?}");
    assert!(!printed.contains("s3cret"), "Debug printed a secret: {printed}");

    // Both a password and a password file: which one wins would be a guess.
    let both = default_text().replacen(
        "password = \"${OMRS_HQ_PASSWORD:-hq}\"",
        &format!("password = \"x\"\npassword_file = \"{}\"", hq_pw.display()),
        1,
    );
    assert!(err_of(&both).contains("hq.database.password_file: set the password or the password file, not both"), "{}", err_of(&both));
    // A missing file is named with its key, before anything connects.
    let missing = default_text().replacen("password = \"${OMRS_HQ_PASSWORD:-hq}\"", "password_file = \"/nonexistent/hq.password\"", 1);
    let err = err_of(&missing);
    assert!(err.contains("hq.database.password_file") && err.contains("/nonexistent/hq.password"), "{err}");
    // So is a TLS CA file that is not there.
    let tls = default_text().replacen("database = \"openmrs_hq\"\n", "database = \"openmrs_hq\"\n[hq.database.tls]\nca_file = \"/nonexistent/ca.pem\"\n", 1);
    let err = err_of(&tls);
    assert!(err.contains("hq.database.tls.ca_file") && err.contains("is not a readable file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Helpers shared by the simulator's integration tests (real MariaDB from scripts/dev-up).
#![allow(dead_code)]

use std::path::PathBuf;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::config::{Config, SiteConfig};
use omrs_simulate::SimulateArgs;

pub fn root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..")
}

pub fn config() -> Config {
    Config::load(&root().join("omrs-stream.toml")).expect("the shipped omrs-stream.toml loads")
}

/// The OpenMRS demo dump (scripts/test puts it in place and sets `OMRS_DEMO_DUMP`).
pub fn dump() -> PathBuf {
    omrs_core::openmrs::default_dump()
}

/// Arguments as the CLI would parse them, for an isolated database name.
pub fn args(database: &str, seed: u64, patients: usize, dup_fraction: f64) -> SimulateArgs {
    SimulateArgs {
        patients,
        dup_fraction,
        seed,
        burst: true,
        manifest: std::env::temp_dir().join(format!("{database}-manifest.json")),
        database: Some(database.to_string()),
        dump: dump(),
        quiet: true,
        ..SimulateArgs::default()
    }
}

pub async fn connect(site: &SiteConfig, database: &str) -> Conn {
    let opts = OptsBuilder::default()
        .ip_or_hostname(site.database.host.clone())
        .tcp_port(site.database.port)
        .user(Some("omrs"))
        .pass(Some("omrs"))
        .db_name(Some(database.to_string()))
        .prefer_socket(false);
    Conn::new(opts).await.unwrap_or_else(|e| panic!("{}: {e} (is scripts/dev-up running?)", site.name))
}

pub async fn drop_db(site: &SiteConfig, database: &str) {
    let mut c = connect(site, "mysql").await;
    c.query_drop(format!("DROP DATABASE IF EXISTS `{database}`")).await.unwrap();
}

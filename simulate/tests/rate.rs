//! `--rate` holds: 2000 row changes/s across 3 sites for 30 s, within ±10 %, measured
//! independently by the site servers' own row counters (Handler_write/update/delete; MariaDB
//! 10.11 has no Innodb_rows_*). The simulator's own start-up queries add a few hundred rows of
//! temporary-table writes, well under 1 % of the 60,000 expected. Its own test binary, so no other
//! test writes to the servers meanwhile.

mod common;

use std::time::Instant;

use common::*;
use mysql_async::prelude::Queryable;

async fn server_row_changes(db: &str) -> i64 {
    let cfg = config();
    let mut total = 0;
    for site in &cfg.sites {
        let mut c = connect(site, db).await;
        let rows: Vec<(String, String)> = c
            .query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Handler_write', 'Handler_update', 'Handler_delete')")
            .await
            .unwrap();
        total += rows.iter().map(|(_, v)| v.parse::<i64>().unwrap()).sum::<i64>();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_2000_holds_within_ten_percent_for_30_s() {
    let cfg = config();
    let db = "sim_test_rate";
    let mut a = args(db, 5, 2000, 0.2);
    a.provision_only = true;
    omrs_simulate::run(&cfg, &a).await.unwrap();

    let before = server_row_changes(db).await;
    let mut a = args(db, 5, 2000, 0.2);
    a.no_provision = true;
    a.rate = Some(2000.0);
    a.burst = false;
    a.duration = Some(30.0);
    let t = Instant::now();
    let m = omrs_simulate::run(&cfg, &a).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    let after = server_row_changes(db).await;

    let measured = (after - before) as f64 / secs;
    let reported = m.row_changes as f64 / secs;
    println!("rate: measured {measured:.0} row changes/s by the servers, {reported:.0}/s by the simulator, over {secs:.1} s");
    assert!((1800.0..=2200.0).contains(&measured), "the servers saw {measured:.0} row changes/s, want 2000 ± 10 %");
    assert!((1800.0..=2200.0).contains(&reported), "simulator reported {reported:.0}/s");
    for site in &cfg.sites {
        drop_db(site, db).await;
    }
}
